# call 2: native stacks of the first step (py-spy, 100 Hz, idle included) on 2-layer presets; page cache dropped
# first (--evict) or not
source .carry/setup.sh
python3 -m pip install -q --no-deps .carry/py_spy-*.whl > /dev/null 2>&1 || echo "py-spy install failed"
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step-2l.jsonl
spy() { local name=$1; shift; timeout 100 py-spy record --native --threads --idle -r 100 --format raw -o $OUT/pyspy-$name.txt -- python3 $F "$@" --out $J 2>$OUT/$name.err | tail -1; el $name; }
timeout 100 python3 $F 4bit:offload --layers 2 --evict --out $J 2>$OUT/l-evict.err | tail -1; el llama evict plain
spy llama-evict 4bit:offload --layers 2 --evict --only-first
timeout 100 python3 $F 4bit:offload --layers 2 --out $J 2>$OUT/l-warm.err | tail -1; el llama warm plain
spy llama-warm 4bit:offload --layers 2 --only-first
spy gemma-evict 4bit:offload --model gemma-7b --layers 2 --evict --only-first
gzip $OUT/pyspy-*.txt; tail -2 $OUT/*.err | cut -c1-300
