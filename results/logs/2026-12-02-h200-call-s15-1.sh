# call 1: where the first step's time goes on a fresh machine. Process A is the machine's first (cold disk);
# B..F drop the page cache first (--evict); C and G under py-spy --native; E warms up on a tiny batch first.
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step.jsonl
timeout 120 python3 $F 4bit:offload --out $J 2>$OUT/A.err | tail -1; el A cold machine
timeout 120 python3 $F 4bit:offload --evict --out $J 2>$OUT/B.err | tail -1; el B evicted
timeout 150 py-spy record --native --threads -r 250 --format raw -o $OUT/pyspy-C.txt -- python3 $F 4bit:offload --evict --out $J 2>$OUT/C.err | tail -1; el C evicted py-spy
timeout 120 python3 $F 4bit:offload --out $J 2>$OUT/D.err | tail -1; el D warm
timeout 120 python3 $F 4bit:offload --evict --prewarm tiny --out $J 2>$OUT/E.err | tail -1; el E evicted prewarm tiny
timeout 120 python3 $F 4bit:offload --evict --model gemma-7b --out $J 2>$OUT/F.err | tail -1; el F gemma evicted
L=$(( 560 - SECONDS )); timeout $L py-spy record --native --threads -r 250 --format raw -o $OUT/pyspy-G.txt -- python3 $F 4bit:offload --out $J 2>$OUT/G.err | tail -1; el G warm py-spy
gzip $OUT/pyspy-*.txt; tail -3 $OUT/*.err | cut -c1-300
