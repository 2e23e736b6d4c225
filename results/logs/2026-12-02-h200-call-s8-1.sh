# call 1 (~9.5 min): the offload MLP interval (save_every 2 = default, 3, 4, auto from branch offload-bus-interval)
# beside Unsloth QLoRA, one process each, --profile; MODELS default qwen2.5-7b,llama-3-8b.
source .carry/setup.sh
export FASTBENCH_GIT_SHA=$(cat .carry/sha)+bus PYTORCH_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
rm -rf /tmp/B && cp -r . /tmp/B && cd /tmp/B && git apply .carry/b.patch && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1; el branch installed
A=fused-4bit:ckpt=offload
timeout $(( 565 - ($(date +%s) - T0) )) fastbench compare --models ${MODELS:-qwen2.5-7b,llama-3-8b} --arms $A,$A:save_every=3,$A:save_every=4,$A:save_every=auto,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 110 --seq-len 2048 --batch 2 --profile --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-offload-interval.log 2>&1
grep -E "^\[|^\| |^ok|^FAIL|rror" $OUT/compare-offload-interval.log | cut -c1-230 | tail -30; rm -f $OUT/r/*.csv
python3 -c "
import json,glob
for f in glob.glob('$OUT/r/*.json'):
    for r in json.load(open(f))['runs']:
        p=r.get('profile') or {}; h=p.get('host') or p
        print(r['model'], r['arm'], 'interval', r.get('offload_save_every'), r.get('offload_copy_gbps'), r.get('offload_gemm_tflops'), 'waits', r.get('offload_queue_waits'), 'copy_wait_ms', h.get('copy_wait_ms'), 'reserved', r.get('peak_reserved_gib'))
"
el all done
