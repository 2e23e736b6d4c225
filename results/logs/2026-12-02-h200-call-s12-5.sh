# call 5 (<= 145 s): the k-quant GPU test (fixed) five times; mistral-7b's trainable/gradient/optimizer dtypes
# and memory, ours (offload) then Unsloth QLoRA's.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 25 bash -c 'for i in 1 2 3; do python3 -m pytest -q -m gpu tests/test_export_kquants.py -p no:cacheprovider 2>&1 | tail -1; done' > $OUT/kq-test.log; cat $OUT/kq-test.log; el kq
for A in fused-4bit:ckpt=offload unsloth-qlora; do L=$(( 142 - SECONDS )); timeout $L python3 .carry/param_dtypes.py $A mistral-7b > $OUT/dtypes-${A%%:*}.log 2>&1; tail -1 $OUT/dtypes-${A%%:*}.log | cut -c1-1200; el $A; done
