# call 1: what bounds the 4-bit offload step (host or GPU, forward or backward): known host busy-waits and GPU
# sleeps added at every recomputed unit, the step's growth measured (llama-3-8b, then mistral-7b)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
lscpu | grep -E "Model name|^CPU\(s\)|MHz" | head -4
P=results/logs/2026-12-04-h200-step-bound-probe.py
timeout 260 python3 $P llama-3-8b 4bit:offload 6 8 150 $OUT/bound-llama.json > $OUT/bound-llama.log 2>&1; tail -8 $OUT/bound-llama.log | cut -c1-600; el llama
timeout 200 python3 $P mistral-7b 4bit:offload 4 8 150 $OUT/bound-mistral.json > $OUT/bound-mistral.log 2>&1; tail -6 $OUT/bound-mistral.log | cut -c1-600; el mistral
