# call 1 (<= 570 s): the NF4 workspace A/B in one process (mistral-7b: together / apart / apart+chunk2048), then
# mistral-7b and llama-3-8b fused-4bit offload beside Unsloth QLoRA (one process each).
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 170 python3 .carry/ab_workspace.py mistral-7b 6 > $OUT/ab-workspace-mistral.log 2>&1; grep -v Warning $OUT/ab-workspace-mistral.log | tail -6 | cut -c1-260; el ab
L=$(( 565 - SECONDS )); timeout $L fastbench compare --models mistral-7b,llama-3-8b --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare.log 2>&1
grep -E "^\| |rror" $OUT/compare.log | cut -c1-230 | tail -6; rm -f $OUT/r/*.csv; el compare
