# call 4: main (.carry/main-tree) against this tree (main + Triton's hash computed in the background while the
# model loads): first step of the 2-layer llama-3-8b preset with the page cache dropped, alternating
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 -c "import sys; sys.path.insert(0, 'tools'); from ab_trees import _link; _link('.carry/main-tree', '/tmp/pkg-main')"
F=tools/first_step_breakdown.py; J=$OUT/first-step-ab-triton-key.jsonl
fs() { local tree=$1; shift; if [ $tree = main ]; then PYTHONPATH=/tmp/pkg-main:$PYTHONPATH timeout 60 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | cut -c300-480; else timeout 60 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | cut -c300-480; fi; el $tree; }
for t in main branch main branch main branch; do [ $SECONDS -lt 190 ] && fs $t 4bit:offload --layers 2 --evict; done
