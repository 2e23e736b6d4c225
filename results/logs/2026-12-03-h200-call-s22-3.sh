# call 3: where the host waits in pipelined steps (per phase), with and without the mask read; the 4-bit offload
# step's GPU waits charged to host ops in 3 pipelined steps
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
for a in bf16:auto 4bit:offload; do timeout 110 python3 results/logs/2026-12-03-h200-pipelined-phase-host.py $a llama-3-8b > $OUT/phase-host-${a/:/-}.log 2>&1; cut -c1-260 $OUT/phase-host-${a/:/-}.log | tail -6; el $a; done
timeout $((330 - SECONDS)) python3 tools/gpu_gaps.py --pipelined 3 4bit:offload > $OUT/gaps-pipelined-4bit-offload.log 2>&1; cut -c1-200 $OUT/gaps-pipelined-4bit-offload.log; el gaps 4bit
