# call (ready, not yet run): where the 4-bit offload step's host time goes, by py-spy with native frames at a rate it
# keeps up with (500 a second fell 10 s behind and never wrote its file); summarise here with
# results/logs/2026-12-02-h200-pyspy-summary.py
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 240 py-spy record --native --threads -r 100 --format raw -o $OUT/pyspy-4bit-offload.txt -- python3 results/logs/2026-12-02-h200-pyspy-stepper.py 4bit:offload > $OUT/pyspy-stepper.log 2>&1; tail -2 $OUT/pyspy-stepper.log | cut -c1-200; ls -la $OUT; gzip $OUT/pyspy-*.txt; el pyspy
