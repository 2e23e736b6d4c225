# call 3: where the pipelined steps' idle time comes from: the host ops the GPU waits for (gpu_gaps.py --pipelined),
# Python's garbage collector off
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 110 python3 tools/gpu_gaps.py --pipelined 3 bf16:auto > $OUT/gaps-pipelined-bf16-auto.log 2>&1; cut -c1-200 $OUT/gaps-pipelined-bf16-auto.log; el gaps bf16
timeout $((200 - SECONDS)) python3 results/logs/2026-12-03-h200-pipelined-idle.py bf16:auto llama-3-8b gc-off > $OUT/idle-bf16-auto-gc-off.log 2>&1; head -12 $OUT/idle-bf16-auto-gc-off.log | cut -c1-200; el gc-off
