# call 4: the first step on a freshly started machine: gemma-7b 4-bit offload as the machine's first process (cold
# disk), then again with the page cache dropped (--evict); llama-3-8b bf16 auto with the page cache dropped
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step.jsonl
timeout 170 python3 $F 4bit:offload --model gemma-7b --out $J 2>$OUT/A.err | tail -1 | cut -c1-600; el A gemma cold machine
timeout 170 python3 $F 4bit:offload --model gemma-7b --evict --out $J 2>$OUT/B.err | tail -1 | cut -c1-600; el B gemma evicted
timeout 150 python3 $F bf16:auto --evict --out $J 2>$OUT/C.err | tail -1 | cut -c1-600; el C llama bf16 auto evicted
tail -2 $OUT/*.err | cut -c1-300
