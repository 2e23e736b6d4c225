# call 2 (<= 565 s): with the offloaded MLP input no longer held on the GPU: mistral-7b's memory timeline (a step
# after two, and the first step), mistral-7b
# fused-4bit offload (and with prefetch_groups=2) beside Unsloth QLoRA (one process each), then the fused GPU tests (modes agree, offload,
# memory/budget) in what time is left.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 120 python3 tools/memory_timeline.py --preset mistral-7b --out $OUT/timeline-mistral > $OUT/timeline-mistral.log 2>&1; rm -f $OUT/timeline-mistral/snapshot.pickle; sed -n 2,16p $OUT/timeline-mistral.log | cut -c1-200; el timeline
timeout 120 python3 tools/memory_timeline.py --preset mistral-7b --warmup 0 --out $OUT/timeline-mistral-first > $OUT/timeline-mistral-first.log 2>&1; rm -f $OUT/timeline-mistral-first/snapshot.pickle; sed -n 2,16p $OUT/timeline-mistral-first.log | cut -c1-200; el timeline-first
timeout 260 fastbench compare --models mistral-7b --arms fused-4bit:ckpt=offload,fused-4bit:ckpt=offload:prefetch_groups=2,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare.log 2>&1
grep -E "^\| |rror" $OUT/compare.log | cut -c1-230 | tail -4; rm -f $OUT/r/*.csv; el compare
unset PYTORCH_ALLOC_CONF
L=$(( 560 - SECONDS )); timeout $L python3 -m pytest -v -m gpu tests/fused/test_offload_gpu.py tests/fused/test_fused_gpu.py tests/fused/test_lora_functions.py tests/fused/test_memory_gpu.py -p no:cacheprovider --tb=short > $OUT/gputests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gputests.log | cut -c1-200 | tail -16
el all done
