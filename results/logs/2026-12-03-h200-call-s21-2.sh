# call 2: the compute stream's idle time in pipelined steps, bf16 auto and 4-bit offload (main)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
for a in bf16:auto 4bit:offload; do timeout 150 python3 results/logs/2026-12-03-h200-pipelined-idle.py $a llama-3-8b > $OUT/idle-${a/:/-}.log 2>&1; cut -c1-220 $OUT/idle-${a/:/-}.log | tail -32; el $a; done
