# call (ran from branch unit-graphs at 6328563): the branch's backward graphs: the tiny-model capture check (first failure printed
# if any), the GPU test against eager units, peak memory and step time with graphs on and off (one process each),
# then an A/B of the 4-bit offload step, main (A, .carry/main-tree) against the branch (B)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 90 python3 results/logs/2026-12-03-h200-unit-graphs-capture-diag.py global 4bit > $OUT/diag.log 2>&1; grep -m1 "captures" $OUT/diag.log | cut -c1-300; grep -A40 "first failure" $OUT/diag.log | tail -25 | cut -c1-250; el diag
timeout 200 python3 -m pytest -m gpu tests/fused/test_unit_graphs_gpu.py -p no:cacheprovider -q -x 2>&1 | tail -40 > $OUT/gputests-graphs.log; tail -5 $OUT/gputests-graphs.log | cut -c1-400; el tests
for g in 0 1; do timeout 100 python3 results/logs/2026-12-03-h200-unit-graphs-memory.py $g 2>&1 | tail -2 | tee -a $OUT/graphs-memory.log | cut -c1-600; done; el memory
timeout 170 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 8 --steps 8 --seconds 150 --out $OUT/ab-graphs-4bit-offload.json > $OUT/ab-graphs-4bit-offload.log 2>&1; tail -4 $OUT/ab-graphs-4bit-offload.log | cut -c1-300; el ab
