# call 1 (<= 560 s): the machine's host-memory limits as the offload check reads them; mistral-7b fused-4bit
# offload (MLP backward freeing h before dh) with the default and a 0.125 GiB copy queue, and qwen3-8b offload,
# beside Unsloth QLoRA (one process each, interleaved by the harness).
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
{ cat /proc/self/cgroup; grep -E "MemTotal|MemAvailable" /proc/meminfo; for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.current /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.usage_in_bytes; do [ -e $f ] && echo "$f $(cat $f)"; done
  python3 -c "from fastbench.distributed.host_memory import available_host_bytes, cgroup_memory_room as r; print('available_host_bytes', available_host_bytes() / 2**30, 'cgroup room', r())"; } > $OUT/host-memory.log 2>&1; cat $OUT/host-memory.log | cut -c1-200; el host
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 120 python3 tools/memory_timeline.py --preset mistral-7b --out $OUT/timeline-mistral > $OUT/timeline-mistral.log 2>&1; rm -f $OUT/timeline-mistral/snapshot.pickle; head -30 $OUT/timeline-mistral.log | cut -c1-250; el timeline
L=$(( 555 - SECONDS )); timeout $L fastbench compare --models mistral-7b,qwen3-8b --arms fused-4bit:ckpt=offload,fused-4bit:ckpt=offload:copy_queue_gib=0.125,unsloth-qlora --arm-models "fused-4bit:ckpt=offload:copy_queue_gib=0.125@mistral-7b" --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare.log 2>&1
grep -E "^\| |rror" $OUT/compare.log | cut -c1-230 | tail -12; rm -f $OUT/r/*.csv
el all done
