# call 2 (~4.5 min): the three GPU tests that failed, with their tracebacks; then the rest of the GPU suite (benchmarks aside)
source .carry/setup.sh > /dev/null
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
timeout 90 python3 -m pytest -q -m gpu tests/bench/test_longest_context.py tests/distributed/test_ddp_gpu.py --tb=long > $OUT/gputests-failed.log 2>&1; tail -3 $OUT/gputests-failed.log | cut -c1-300; el failed
L=$(( 215 - ($(date +%s) - T0) )); timeout $L python3 -m pytest -q -m gpu tests --ignore=tests/benchmarks --ignore=tests/bench/test_longest_context.py --ignore=tests/distributed/test_ddp_gpu.py --ignore=tests/autotune --tb=short > $OUT/gputests-rest.log 2>&1; tail -3 $OUT/gputests-rest.log | cut -c1-300; el rest
