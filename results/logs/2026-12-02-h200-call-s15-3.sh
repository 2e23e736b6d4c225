# call 3: main (.carry/main-tree) against the branch (this tree): first step of 2-layer presets with the page
# cache dropped, alternating; the step's speed A/B (bf16:auto); the
# attention GPU tests
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 -c "import sys; sys.path.insert(0, 'tools'); from ab_trees import _link; _link('.carry/main-tree', '/tmp/pkg-main')"
F=tools/first_step_breakdown.py; J=$OUT/first-step-ab.jsonl
fs() { local tree=$1; shift; if [ $tree = main ]; then PYTHONPATH=/tmp/pkg-main:$PYTHONPATH timeout 100 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | cut -c1-400; else timeout 100 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | cut -c1-400; fi; el $tree "$@"; }
for t in main branch main branch; do fs $t 4bit:offload --layers 2 --evict; done
for t in main branch; do fs $t 4bit:offload --model gemma-7b --layers 2 --evict; done
timeout 130 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 110 --out $OUT/ab-bf16-auto.json > $OUT/ab-bf16-auto.log 2>&1; tail -4 $OUT/ab-bf16-auto.log; el ab bf16
timeout 170 python3 -m pytest -m gpu tests/fused/test_varlen_attention.py tests/fused/test_fused_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -5 $OUT/gputests.log | cut -c1-300; el tests
