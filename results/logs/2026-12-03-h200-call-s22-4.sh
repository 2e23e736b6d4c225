# call 4: the LoRA factor cast on CUDA's multi-tensor path (branch factor-cast-fast-path) against main: A/B of the
# 4-bit offload step, the GPU tests of the LoRA Functions and the offload path; py-spy (native frames) of the
# branch's pipelined 4-bit offload steps: where the host's time goes
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 115 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 6 --steps 8 --seconds 100 --out $OUT/ab-factor-cast-4bit-offload.json > $OUT/ab-factor-cast-4bit-offload.log 2>&1; tail -3 $OUT/ab-factor-cast-4bit-offload.log | cut -c1-300; el ab
timeout 130 python3 -m pytest -m gpu tests/fused/test_lora_functions.py tests/fused/test_offload_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el tests
timeout 80 py-spy record --native --threads -r 500 --format raw -o $OUT/pyspy-4bit-offload.txt -- python3 results/logs/2026-12-02-h200-pyspy-stepper.py 4bit:offload > $OUT/pyspy-stepper.log 2>&1; tail -2 $OUT/pyspy-stepper.log | cut -c1-200; gzip $OUT/pyspy-*.txt; el pyspy
