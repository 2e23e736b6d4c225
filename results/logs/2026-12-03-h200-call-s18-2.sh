# call 2: main (.carry/main-tree, the rank-r term first) against the branch (residual sums inside O's and down's
# products): A/B of the step on llama-3-8b bf16:auto; the fused, offload, LoRA and autocast GPU tests; then the
# branch beside Unsloth on llama-3-8b: bf16 fused:ckpt=auto against Unsloth LoRA, fused-4bit offload against
# Unsloth QLoRA (one process each)
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 115 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 90 --out $OUT/ab-residual-bf16-auto.json > $OUT/ab-residual-bf16-auto.log 2>&1; tail -4 $OUT/ab-residual-bf16-auto.log | cut -c1-300; el ab bf16
timeout 120 python3 -m pytest -m gpu tests/fused/test_fused_gpu.py tests/fused/test_offload_gpu.py tests/fused/test_lora_functions.py tests/fused/test_checkpointing_autocast.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -5 $OUT/gputests.log | cut -c1-300; el tests
C="--models llama-3-8b --repeats 1 --warmup 2 --steps 10 --timeout 150 --seq-len 2048 --batch 2"
timeout 200 fastbench compare $C --arms fused:ckpt=auto,unsloth --baseline-arm unsloth --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-bf16.log 2>&1; grep -E "^\| |^ok|^FAIL" $OUT/compare-bf16.log | cut -c1-250; el bf16
L=$(( 480 - SECONDS )); timeout $L fastbench compare $C --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-4bit.log 2>&1; grep -E "^\| |^ok|^FAIL" $OUT/compare-4bit.log | cut -c1-250; el 4bit
