# call 5: why the first process on a fresh machine has a longer first step than later ones with the page cache
# dropped: does the CUDA driver's JIT cache (~/.nv/ComputeCache) fill during the first step?
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
cc() { echo "ComputeCache: $(du -sk ~/.nv/ComputeCache 2>/dev/null | cut -f1) KiB, $(find ~/.nv/ComputeCache -type f 2>/dev/null | wc -l) files"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step.jsonl
cc
timeout 100 python3 $F 4bit:offload --model gemma-7b --layers 2 --out $J 2>$OUT/A.err | tail -1 | cut -c1-700; el A gemma 2 layers cold machine; cc
timeout 100 python3 $F 4bit:offload --model gemma-7b --layers 2 --evict --out $J 2>$OUT/B.err | tail -1 | cut -c1-700; el B evicted; cc
CUDA_CACHE_DISABLE=1 timeout 100 python3 $F 4bit:offload --model gemma-7b --layers 2 --evict --out $J 2>$OUT/C.err | tail -1 | cut -c1-700; el C evicted, CUDA_CACHE_DISABLE=1
timeout 100 python3 $F 4bit:offload --model gemma-7b --layers 2 --evict --out $J 2>$OUT/D.err | tail -1 | cut -c1-700; el D evicted
ls -la ~/.nv/ComputeCache 2>&1 | head -5
