# call: the first failure of a recomputed unit's backward capture (tiny llama, NF4 base, offload mode, graphs only)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 80 python3 results/logs/2026-12-03-h200-unit-graphs-capture-diag.py global 4bit graphs-only > $OUT/diag-first-error.log 2>&1; grep -v Warning $OUT/diag-first-error.log | tail -45 | cut -c1-300
