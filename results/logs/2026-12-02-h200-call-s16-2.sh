# call 2: one step of fused-4bit offload at 344,064 tokens (batch 1) on llama-3-8b within an 80 GB card (79.6 GiB,
# an H100 80GB's memory), for Unsloth's published ~342k-token figure
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
free -g | head -2
timeout 560 python3 tools/longest_context.py --arms fused-4bit:ckpt=offload --card-gib 79.6 --model llama-3-8b \
  --start 344064 --max-seq 344064 --granularity 8192 --steps 1 --timeout 540 --out $OUT/longest-context-80.json > $OUT/longest-context-80.log 2>&1
echo "rc $?"; tail -12 $OUT/longest-context-80.log | cut -c1-400
free -g | head -2
