# call 6: the driver's JIT cache emulated empty (CUDA_CACHE_PATH a new directory): gemma-7b 2 layers, page cache
# dropped; with and without a tiny cuDNN attention process run first on the same empty cache
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step.jsonl
fs() { timeout 100 python3 $F 4bit:offload --model gemma-7b --layers 2 --evict --out $J 2>>$OUT/fs.err | tail -1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d[k] for k in ('first_forward_s','first_backward_s','first_step_s','build_s')})"; }
CUDA_CACHE_PATH=/tmp/cc1 fs; el E1 empty JIT cache; du -sk /tmp/cc1
CUDA_CACHE_PATH=/tmp/cc2 timeout 60 python3 .carry/tiny_sdpa.py 16 256 256; el tiny; du -sk /tmp/cc2
CUDA_CACHE_PATH=/tmp/cc2 fs; el E2 after tiny; du -sk /tmp/cc2
CUDA_CACHE_PATH=/tmp/cc3 timeout 60 python3 .carry/tiny_sdpa.py 16 256 2048; el tiny at seq 2048
CUDA_CACHE_PATH=/tmp/cc3 fs; el E3 after tiny at seq 2048
