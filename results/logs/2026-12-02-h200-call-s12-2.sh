# call 2 (<= 475 s from the script's start): why the DDP smoke test with offload did not finish (a world of one
# started by hand, its Python stacks dumped at 100 s); then the rest of the GPU suite, test by test.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29561 TORCHELASTIC_RUN_ID=diag
timeout -s ABRT 100 python3 -X faulthandler tools/ddp_smoke.py --preset llama-3-8b-tiny --seq 256 --batch 2 --steps 3 --warmup 1 --checkpointing offload --out $OUT/ddp-offload.json > $OUT/ddp-offload.log 2>&1; echo "rc $?"
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID
tail -5 $OUT/ddp-offload.log | cut -c1-300; el ddp offload
L=$(( 470 - SECONDS )); timeout $L python3 -m pytest -v -m gpu tests/fused tests/kernels tests/test_export.py tests/test_export_kquants.py tests/test_train.py tests/test_train_cli.py tests/test_train_packing.py -p no:cacheprovider --tb=short --durations=15 > $OUT/gputests-rest.log 2>&1
grep -cE "PASSED" $OUT/gputests-rest.log; grep -E "FAILED|ERROR" $OUT/gputests-rest.log | head -10 | cut -c1-250; tail -2 $OUT/gputests-rest.log | cut -c1-250
el all done
