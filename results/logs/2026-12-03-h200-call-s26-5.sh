# call 5: the 4-bit offload step of llama-3-8b before the RoPE change (07b5e24, A, .carry/main-tree) and after (B),
# each tree with its own bundled configs and compiled kernels, alternating rounds in one process pair
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 170 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 6 --steps 8 --seconds 120 --out $OUT/ab-rope-4bit-offload.json > $OUT/ab-rope-4bit-offload.log 2>&1; tail -4 $OUT/ab-rope-4bit-offload.log | cut -c1-300; el ab
