# call 3: tree A = offload-every-4, B = A + host-overhead branch. (1) A/B on qwen2.5-7b 4bit:offload;
# (2) from tree B: llama-3-8b and mistral-7b beside Unsloth QLoRA, one process each.
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
rm -rf /tmp/B && cp -r . /tmp/B && (cd /tmp/B && git apply .carry/ho.patch); el trees
timeout 200 python3 tools/ab_trees.py . /tmp/B --model qwen2.5-7b --arm 4bit:offload --rounds 6 --steps 8 --out $OUT/ab-host-overhead-every4-qwen.json > $OUT/ab-host-overhead-every4-qwen.log 2>&1; tail -4 $OUT/ab-host-overhead-every4-qwen.log | cut -c1-300; el ab
cd /tmp/B && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1; export FASTBENCH_GIT_SHA=$(cat .carry/sha)+ho; el B installed
L=$(( 545 - ($(date +%s) - T0) )); timeout $L fastbench compare --models llama-3-8b,mistral-7b --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 120 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-families-ho.log 2>&1; grep -E "^\[|^\| |^ok|^FAIL" $OUT/compare-families-ho.log | cut -c1-250; rm -f $OUT/r/*.csv $OUT/rep/*.png
el all done
