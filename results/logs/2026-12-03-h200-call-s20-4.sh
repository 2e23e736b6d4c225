# call 4 (this tree: glu-low-rank): the GLU with rank-r terms at a few configs of each kind, the fastest written
# into this copy's heuristic; A/B of the step against main (bf16:auto) with it; GPU tests of the GLU and the LoRA
# Functions
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 90 python3 results/logs/2026-12-03-h200-glu-low-rank-pick.py 2>&1 | cut -c1-300 | tee $OUT/glu-pick.log; cp kernels/_glu.py $OUT/; el pick
timeout 75 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 70 --out $OUT/ab-glu-bf16-auto.json > $OUT/ab-glu-bf16-auto.log 2>&1; tail -2 $OUT/ab-glu-bf16-auto.log | cut -c1-300; el ab bf16
timeout 60 python3 -m pytest -m gpu tests/kernels/test_glu.py tests/fused/test_lora_functions.py -p no:cacheprovider -q --tb=short > $OUT/gputests-glu.log 2>&1; tail -3 $OUT/gputests-glu.log | cut -c1-300; el tests
