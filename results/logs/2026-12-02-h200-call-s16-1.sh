# call 1: the whole-layer fallback's GPU test; SDPA backends A/B (cuDNN vs flash) on bf16 auto, llama-3-8b and gemma-7b
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 120 python3 -m pytest -m gpu -v tests/fused/test_offload_state.py -p no:cacheprovider --tb=short > $OUT/gputests-offload-state.log 2>&1; tail -6 $OUT/gputests-offload-state.log | cut -c1-250; el tests
for m in gemma-7b llama-3-8b; do
  timeout 220 python3 .carry/sdpa_ab.py $m 6 auto 16 > $OUT/sdpa-ab-$m-bf16-auto.log 2>&1; grep -v "^round\|Loading" $OUT/sdpa-ab-$m-bf16-auto.log | tail -8 | cut -c1-300; el $m
done
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $OUT/gpu.csv
