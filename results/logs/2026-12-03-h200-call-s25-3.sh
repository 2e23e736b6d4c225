# call: why the recomputed units' backward captures fail (tiny llama, each capture_error_mode), then, with the mode
# that captured the most set as the default in this copy of the branch, peak memory and step time with graphs on
# and off, and an A/B of the 4-bit offload step against main
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
for m in global thread_local relaxed; do timeout 90 python3 results/logs/2026-12-03-h200-unit-graphs-capture-diag.py $m 4bit > $OUT/diag-$m.log 2>&1; grep -m1 "captures" $OUT/diag-$m.log | cut -c1-300; done
tail -25 $OUT/diag-global.log | cut -c1-250; el diag
best=$(for m in global thread_local relaxed; do n=$(grep -m1 -o "captures [0-9]*" $OUT/diag-$m.log | grep -o "[0-9]*"); echo "${n:-0} $m"; done | sort -n -r | head -1 | cut -d' ' -f2)
echo "mode used: $best"; sed -i "s/self.capture_error_mode = \"global\"/self.capture_error_mode = \"$best\"/" fastbench/fused/checkpointing/graphs.py
for g in 0 1; do timeout 100 python3 results/logs/2026-12-03-h200-unit-graphs-memory.py $g 2>&1 | tail -2 | tee -a $OUT/graphs-memory.log | cut -c1-600; done; el memory
timeout 165 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 8 --steps 8 --seconds 145 --out $OUT/ab-graphs-4bit-offload.json > $OUT/ab-graphs-4bit-offload.log 2>&1; tail -4 $OUT/ab-graphs-4bit-offload.log | cut -c1-300; el ab
