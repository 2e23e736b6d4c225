# call: Triton launches through fastbench.kernels._launch (branch direct-launch) against main: the host cost of one
# launch, the GPU tests of the kernels and the fused path on the branch, an A/B of the 4-bit offload step
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 results/logs/2026-12-03-h200-triton-launch-cost.py 2>&1 | tee $OUT/triton-launch-cost.log; el launch-cost
timeout 190 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 10 --steps 8 --seconds 175 --out $OUT/ab-direct-launch-4bit-offload.json > $OUT/ab-direct-launch-4bit-offload.log 2>&1; tail -4 $OUT/ab-direct-launch-4bit-offload.log | cut -c1-300; el ab
timeout 200 python3 -m pytest tests/kernels tests/fused/test_lora_functions.py tests/fused/test_offload_gpu.py -m "gpu or not gpu" -p no:cacheprovider -q --tb=short -x > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el tests
