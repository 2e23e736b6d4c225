# call 2: the GLU with rank-r terms against main's products + GLU at llama-3-8b's shapes (every candidate), and one
# profiled bf16:auto step of this tree (glu-low-rank)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 200 python3 results/logs/2026-12-03-h200-glu-low-rank-bench.py > $OUT/glu-bench.log 2>&1; cut -c1-250 $OUT/glu-bench.log; el bench
timeout 80 python3 results/logs/2026-12-02-h200-kernels-top.py bf16:auto llama-3-8b > $OUT/kernels-top.log 2>&1; head -24 $OUT/kernels-top.log | cut -c1-180; el profile
