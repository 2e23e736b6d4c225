# call 1: main (.carry/main-tree) against the branch (the rank-r LoRA term written first, the base product added
# in its epilogue): A/B of the step on llama-3-8b bf16:auto and 4bit:offload; the fused GPU tests
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 170 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 150 --out $OUT/ab-prefill-bf16-auto.json > $OUT/ab-prefill-bf16-auto.log 2>&1; tail -4 $OUT/ab-prefill-bf16-auto.log | cut -c1-300; el ab bf16
timeout 200 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 6 --steps 8 --seconds 180 --out $OUT/ab-prefill-4bit-offload.json > $OUT/ab-prefill-4bit-offload.log 2>&1; tail -4 $OUT/ab-prefill-4bit-offload.log | cut -c1-300; el ab 4bit
timeout 200 python3 -m pytest -m gpu tests/fused/test_fused_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -5 $OUT/gputests.log | cut -c1-300; el tests
