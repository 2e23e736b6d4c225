# call 1 (~9.3 min): the GPU test suite on the merged code; qwen3-8b ours beside Unsloth QLoRA (one process each);
# mistral-7b trainable/grad/AdamW dtypes, Unsloth's against ours.
source .carry/setup.sh
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
timeout 230 python3 -m pytest -q -m gpu tests -p no:cacheprovider > $OUT/gputests.log 2>&1; tail -2 $OUT/gputests.log | cut -c1-300; el gputests
export PYTORCH_ALLOC_CONF=expandable_segments:True
for A in unsloth-qlora fused-4bit:ckpt=offload; do timeout 80 python3 .carry/param_dtypes.py $A mistral-7b 2>&1 | tail -1 | cut -c1-400; done; el dtypes
L=$(( 555 - ($(date +%s) - T0) )); timeout $L fastbench compare --models qwen3-8b --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --profile --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-qwen3.log 2>&1
grep -E "^\| |rror" $OUT/compare-qwen3.log | cut -c1-230 | tail -4; rm -f $OUT/r/*.csv
el all done
