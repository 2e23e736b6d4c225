# call 2: where the small kernels of a bf16 auto and a 4-bit offload step come from (op, shapes, source line)
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
for a in bf16:auto 4bit:offload; do timeout 100 python3 results/logs/2026-12-03-h200-small-kernel-sources.py $a llama-3-8b > $OUT/small-kernels-${a/:/-}.log 2>&1; cut -c1-260 $OUT/small-kernels-${a/:/-}.log | tail -46; el $a; done
