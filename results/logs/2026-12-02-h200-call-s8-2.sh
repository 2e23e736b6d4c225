# call 2: tree = offload-every-4 (default save_every=4). (1) A/B of the host-overhead branch on top of it, llama-3-8b
# 4bit:offload; (2) qwen2.5-7b: the copy queue and a longer interval; (3) GPU tests of the offload state;
# (4) mistral-7b beside Unsloth QLoRA if time is left.
source .carry/setup.sh
export FASTBENCH_GIT_SHA=$(cat .carry/sha) PYTORCH_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
rm -rf /tmp/B && cp -r . /tmp/B && (cd /tmp/B && git apply .carry/ho.patch); el trees
timeout 210 python3 tools/ab_trees.py . /tmp/B --arm 4bit:offload --rounds 6 --steps 8 --out $OUT/ab-host-overhead-every4.json > $OUT/ab-host-overhead-every4.log 2>&1; tail -4 $OUT/ab-host-overhead-every4.log | cut -c1-300; el ab
A=fused-4bit:ckpt=offload
timeout 150 fastbench compare --models qwen2.5-7b --arms $A,$A:copy_queue_gib=0.5,$A:save_every=6 --baseline-arm $A --repeats 1 --warmup 2 --steps 8 --timeout 70 --seq-len 2048 --batch 2 --profile --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-qwen-queue.log 2>&1
grep -E "^\| |^ok|^FAIL|rror" $OUT/compare-qwen-queue.log | cut -c1-200 | tail -6; el qwen
python3 -c "
import json,glob
for f in glob.glob('$OUT/r/*.json'):
    for r in json.load(open(f))['runs']:
        p=r.get('profile') or {}; h=p.get('host') or {}
        print(r['model'], r['arm'], 'waits', r.get('offload_queue_waits'), 'copy_wait_ms', h.get('copy_wait_ms'), 'issue', h.get('issue_ms'), 'step', h.get('step_ms'), 'busy', p.get('gpu_busy_ms'), 'reserved', r.get('peak_reserved_gib'))
"; rm -f $OUT/r/*.csv
timeout 60 python3 -m pytest -q -m gpu tests/fused/test_offload_state.py 2>&1 | tail -2; el gputest
L=$(( 560 - ($(date +%s) - T0) )); [ $L -gt 150 ] && timeout $L fastbench compare --models mistral-7b --arms $A,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 120 --seq-len 2048 --batch 2 --results-dir $OUT/r2 --reports-dir $OUT/rep2 > $OUT/compare-mistral.log 2>&1; grep -E "^\| |^ok|^FAIL" $OUT/compare-mistral.log | cut -c1-250; rm -f $OUT/r2/*.csv
el all done
