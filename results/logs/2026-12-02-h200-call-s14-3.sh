# call 3 (<= 470 s): llama-3-8b and mistral-7b fused-4bit offload with a profile of one step (time per region:
# why llama-3-8b's step is longer than mistral-7b's by more than Unsloth's is), then the 40 GiB budget at seq 8192.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 200 fastbench compare --models llama-3-8b,mistral-7b --arms fused-4bit:ckpt=offload --profile --repeats 1 --warmup 2 --steps 8 --timeout 95 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-profile.log 2>&1
grep -E "^\| |rror" $OUT/compare-profile.log | cut -c1-200 | tail -30; rm -f $OUT/r/*.csv $OUT/rep/*.png; el profile
unset PYTORCH_ALLOC_CONF
L=$(( 470 - SECONDS )); timeout $L python3 -m pytest -v -s -m gpu tests/fused/test_memory_gpu.py -k budget -p no:cacheprovider --tb=short > $OUT/gputest-budget.log 2>&1
grep -E "budget 40|PASSED|FAILED|ERROR|passed|failed" $OUT/gputest-budget.log | cut -c1-300 | tail -5
el all done
