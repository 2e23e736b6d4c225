# call 2 (<= 585 s): qwen2.5-7b and qwen3-8b fused-4bit offload beside Unsloth QLoRA, gemma-7b ours alone (Unsloth
# fails there), one process each; then the fused GPU tests (modes agree, offload, LoRA functions) in what is left.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 330 fastbench compare --models qwen2.5-7b,qwen3-8b --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-qwen.log 2>&1
grep -E "^\| |rror" $OUT/compare-qwen.log | cut -c1-230 | tail -6; el compare-qwen
timeout 100 fastbench compare --models gemma-7b --arms fused-4bit:ckpt=offload --repeats 1 --warmup 2 --steps 8 --timeout 90 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-gemma.log 2>&1
grep -E "^\| |rror" $OUT/compare-gemma.log | cut -c1-230 | tail -3; rm -f $OUT/r/*.csv; el compare-gemma
unset PYTORCH_ALLOC_CONF
L=$(( 585 - SECONDS )); timeout $L python3 -m pytest -v -m gpu tests/fused/test_lora_functions.py tests/fused/test_fused_gpu.py tests/fused/test_offload_gpu.py -p no:cacheprovider --tb=short > $OUT/gputests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gputests.log | cut -c1-200 | tail -12
el all done
