# call 5: the factor cast A/B again with room for 10 rounds (call 4's stopped after one), then the branch's small
# kernels of the 4-bit offload step (the per-tensor casts gone?)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 190 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 10 --steps 8 --seconds 175 --out $OUT/ab-factor-cast-4bit-offload.json > $OUT/ab-factor-cast-4bit-offload.log 2>&1; tail -3 $OUT/ab-factor-cast-4bit-offload.log | cut -c1-300; el ab
timeout $((265 - SECONDS)) python3 results/logs/2026-12-03-h200-small-kernel-sources.py 4bit:offload llama-3-8b > $OUT/small-kernels-4bit-offload.log 2>&1; grep -n "kernels in one step\|copy_\|foreach" $OUT/small-kernels-4bit-offload.log | cut -c1-200; el kernels
