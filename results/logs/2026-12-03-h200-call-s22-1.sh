# call 1: what the pipelined steps' idle is made of (GC, the mask flags' drain) for bf16 auto and 4-bit offload,
# then the GPU's waits charged to host ops in 3 pipelined bf16 steps
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 170 python3 results/logs/2026-12-03-h200-idle-variants.py bf16:auto llama-3-8b > $OUT/idle-variants-bf16-auto.log 2>&1; tail -8 $OUT/idle-variants-bf16-auto.log | cut -c1-200; el variants bf16
timeout 110 python3 tools/gpu_gaps.py --pipelined 3 bf16:auto > $OUT/gaps-pipelined-bf16-auto.log 2>&1; cut -c1-200 $OUT/gaps-pipelined-bf16-auto.log; el gaps bf16
timeout $((420 - SECONDS)) python3 results/logs/2026-12-03-h200-idle-variants.py 4bit:offload llama-3-8b > $OUT/idle-variants-4bit-offload.log 2>&1; tail -8 $OUT/idle-variants-4bit-offload.log | cut -c1-200; el variants 4bit
