# call 1 (~9.5 min): branch copy-queue-groups (.carry/cq-groups.patch: a kept MLP group larger than the copy queue
# widens it to 1.5x) against main, in one process pair each, on qwen2.5-7b and gemma-7b; then from the branch's tree
# qwen2.5-7b, gemma-7b (reserved memory, copy waits) and qwen3-8b beside Unsloth QLoRA.
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
rm -rf /tmp/B && cp -r . /tmp/B && (cd /tmp/B && git apply .carry/cq-groups.patch); el trees
for M in qwen2.5-7b gemma-7b; do
  timeout 150 python3 tools/ab_trees.py . /tmp/B --model $M --arm 4bit:offload --rounds 6 --steps 8 --out $OUT/ab-cq-groups-$M.json > $OUT/ab-cq-groups-$M.log 2>&1; tail -3 $OUT/ab-cq-groups-$M.log | cut -c1-300; el ab $M
done
cd /tmp/B && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1; export FASTBENCH_GIT_SHA=$(cat .carry/sha)+cqg; el B installed
A=fused-4bit:ckpt=offload
L=$(( 560 - ($(date +%s) - T0) )); timeout $L fastbench compare --models qwen2.5-7b,gemma-7b,qwen3-8b --arms $A,unsloth-qlora --arm-models unsloth-qlora@qwen3-8b --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 110 --seq-len 2048 --batch 2 --profile --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-cqg.log 2>&1
grep -E "^\| |^ok|^FAIL|rror" $OUT/compare-cqg.log | cut -c1-230 | tail -10; rm -f $OUT/r/*.csv
python3 -c "
import json,glob
for f in glob.glob('$OUT/r/*.json'):
    for r in json.load(open(f))['runs']:
        p=r.get('profile') or {}; h=p.get('host') or {}
        print(r['model'], r['arm'], 'copy_wait_ms', h.get('copy_wait_ms'), 'issue', h.get('issue_ms'), 'step', h.get('step_ms'), 'busy', p.get('gpu_busy_ms'), 'reserved', r.get('peak_reserved_gib'))
"
el all done
