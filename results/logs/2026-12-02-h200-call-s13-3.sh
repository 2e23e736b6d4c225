# call 3 (<= 360 s): A/B in one process of the backward's prefetch (bytes vs two groups) on mistral-7b; then the GPU
# memory tests (auto on 24/16 GiB cards, a 40 GiB budget at seq 8192, offload's reserved) in what time is left.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
PYTORCH_ALLOC_CONF=expandable_segments:True timeout 120 python3 .carry/ab_prefetch.py 8 > $OUT/ab-prefetch.log 2>&1; grep -v Warning $OUT/ab-prefetch.log | tail -6 | cut -c1-250; el ab
L=$(( 355 - SECONDS )); timeout $L python3 -m pytest -v -m gpu tests/fused/test_memory_gpu.py -p no:cacheprovider --tb=short > $OUT/gputests-memory.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gputests-memory.log | cut -c1-200 | tail -8
el all done
