# call 4: GPU tests of the changed code: the attention warm-up, the offloader's host limit, the offload and memory suites
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 520 python3 -m pytest -v -m gpu tests/fused/test_attention_warmup.py tests/fused/test_offload_state.py tests/fused/test_offload_gpu.py tests/fused/test_fused_gpu.py tests/fused/test_memory_gpu.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | tee $OUT/gputests.log
echo "[${SECONDS} s] done"
