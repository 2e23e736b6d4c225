# call: py-spy attached to pipelined 4-bit offload steps only (after the model is built and warm): Python frames
# at 100 Hz for 15 s, then native frames at 50 Hz for 20 s (native sampling of the whole process fell behind and
# never finished in two earlier calls)
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 results/logs/2026-12-03-h200-pyspy-attach-stepper.py 4bit:offload 60 > $OUT/attach-stepper.log 2>&1 &
PID=$!
for i in $(seq 200); do grep -q ready $OUT/attach-stepper.log && break; sleep 1; done; el ready
timeout 40 py-spy record --pid $PID --threads -r 100 --duration 15 --format raw -o $OUT/pyspy-attach-python.txt > $OUT/pyspy-python.log 2>&1; el python
timeout 60 py-spy record --pid $PID --threads --native -r 50 --duration 20 --format raw -o $OUT/pyspy-attach-native.txt > $OUT/pyspy-native.log 2>&1; el native
wait $PID; tail -8 $OUT/attach-stepper.log; tail -3 $OUT/pyspy-*.log; gzip $OUT/pyspy-attach-*.txt; ls -la $OUT; el done
