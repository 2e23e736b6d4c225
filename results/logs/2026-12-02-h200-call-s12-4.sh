# call 4 (<= 360 s): the two GPU tests that did not finish in the suite, each alone, the Python stacks of their
# training child dumped (faulthandler, SIGABRT) if it still runs after 120 s; the k-quant GPU/CPU choices;
# the train and packing GPU tests the suite did not reach.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTHONFAULTHANDLER=1
alone() {  # log pattern-of-child test...
  local log=$1 child=$2; shift 2
  python3 -m pytest -v -m gpu "$@" -p no:cacheprovider --tb=short > $OUT/$log 2>&1 & local P=$!
  for i in $(seq 120); do kill -0 $P 2>/dev/null || break; sleep 1; done
  if kill -0 $P 2>/dev/null; then echo "still running at 120 s: SIGABRT to $child"; pkill -ABRT -f "$child"; sleep 8; pkill -f torch.distributed.run; pkill -KILL -f "$child"; fi
  wait $P; grep -E "PASSED|FAILED|passed|failed" $OUT/$log | tail -4 | cut -c1-200
}
alone t-ddp.log tools/ddp_smoke.py tests/distributed/test_ddp_gpu.py; el ddp
alone t-sigterm.log "fastbench train" tests/test_train.py::test_sigterm_from_outside_while_the_gpu_trains; el sigterm
timeout 40 python3 .carry/kq_diag.py > $OUT/kq.log 2>&1; cat $OUT/kq.log | tail -16; el kq
L=$(( 350 - SECONDS )); timeout $L python3 -m pytest -v -m gpu tests/test_train.py tests/test_train_cli.py tests/test_train_packing.py --deselect tests/test_train.py::test_sigterm_from_outside_while_the_gpu_trains -p no:cacheprovider --tb=short > $OUT/t-rest.log 2>&1
grep -E "PASSED|FAILED|passed|failed" $OUT/t-rest.log | cut -c1-200 | tail -12
el all done
