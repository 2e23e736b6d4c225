# call: the host cost of a Triton launch (JITFunction.run against the compiled launcher called directly) and of a few
# torch ops, then py-spy (Python frames only, 100 Hz) on the 4-bit offload step at this code
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 results/logs/2026-12-03-h200-triton-launch-cost.py 2>&1 | tee $OUT/triton-launch-cost.log; el launch-cost
timeout 200 py-spy record --threads -r 100 --format raw -o $OUT/pyspy-4bit-offload.txt -- python3 results/logs/2026-12-02-h200-pyspy-stepper.py 4bit:offload > $OUT/pyspy-stepper.log 2>&1; tail -2 $OUT/pyspy-stepper.log | cut -c1-200; gzip $OUT/pyspy-*.txt; ls -la $OUT; el pyspy
