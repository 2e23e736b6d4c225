# call 5: after the warm-up's own generator: the warm-up's GPU tests and the checkpointing modes that failed
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 400 python3 -m pytest -v -m gpu tests/fused/test_attention_warmup.py tests/fused/test_fused_gpu.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | tee $OUT/gputests.log
echo "[${SECONDS} s] done"
