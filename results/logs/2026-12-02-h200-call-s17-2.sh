# call 2: the attention warm-up while the model loads: the fresh machine's first process (gemma-7b 4-bit offload,
# warm-up on), then page-cache-dropped processes with it off and on, gemma-7b 4-bit and llama-3-8b bf16 auto
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
F=tools/first_step_breakdown.py; J=$OUT/first-step.jsonl
fs() { timeout 150 python3 $F "$@" --out $J 2>>$OUT/fs.err | tail -1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('model','arm','warmup_attention','evict','build_s','first_forward_s','first_backward_s','first_step_s','second_step_s')})"; }
fs 4bit:offload --model gemma-7b; el G1 fresh machine, warm-up on
timeout 120 python3 -m pytest -q -m gpu tests/fused/test_attention_warmup.py 2>&1 | tail -3 | tee $OUT/gputests.log; el gputests
fs 4bit:offload --model gemma-7b --evict --warmup-attention off; el G2 off
fs 4bit:offload --model gemma-7b --evict; el G3 on
fs bf16:auto --model llama-3-8b --evict --warmup-attention off; el L1 off
fs bf16:auto --model llama-3-8b --evict; el L2 on
fs bf16:auto --model llama-3-8b --evict --warmup-attention off; el L3 off
fs bf16:auto --model llama-3-8b --evict; el L4 on
ls ~/.nv/ComputeCache 2>/dev/null | head -3
