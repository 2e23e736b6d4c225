# call 3: the attention warm-up with the driver's kernel cache empty (CUDA_CACHE_PATH a new directory each
# process, page cache dropped), off and on in turn; then the harness's fresh-machine probe with Unsloth's load
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step-empty-jit.jsonl
fs() { timeout 150 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('model','layers','arm','warmup_attention','build_s','first_forward_s','first_backward_s','first_step_s','second_step_s')})"; }
for i in 1 2; do
  for w in off on; do
    CUDA_CACHE_PATH=/tmp/jit-g$i-$w fs 4bit:offload --model gemma-7b --layers 2 --evict --warmup-attention $w; el gemma 2 layers $w
  done
done
for w in off on; do
  CUDA_CACHE_PATH=/tmp/jit-l-$w fs bf16:auto --model llama-3-8b --evict --warmup-attention $w; el llama bf16 auto $w
done
timeout 300 python3 tools/first_step_fresh.py --compiled-cache on --baseline unsloth-qlora --out $OUT/first-step-fresh.json > $OUT/first-step-fresh.log 2>&1; el fresh probe rc=$?
tail -8 $OUT/first-step-fresh.log
