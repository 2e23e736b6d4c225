# call 1: dense Q/K/V and gate/up weights side by side (branch side-by-side-weights) against main: A/B of the bf16
# auto step, the products separate and grouped (and cuBLAS settings), GPU tests of the LoRA Functions and fused path
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 80 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 70 --out $OUT/ab-side-by-side-bf16-auto.json > $OUT/ab-side-by-side-bf16-auto.log 2>&1; tail -2 $OUT/ab-side-by-side-bf16-auto.log | cut -c1-300; el ab
timeout 150 python3 tools/gemm_settings.py > $OUT/gemm-settings.log 2>&1; cut -c1-250 $OUT/gemm-settings.log; el gemm
timeout 150 python3 -m pytest -m gpu tests/fused/test_lora_functions.py tests/fused/test_fused_gpu.py tests/fused/test_offload_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el tests
timeout 60 python3 results/logs/2026-12-02-h200-kernels-top.py bf16:auto llama-3-8b > $OUT/kernels-top.log 2>&1; head -30 $OUT/kernels-top.log | cut -c1-200; el top
