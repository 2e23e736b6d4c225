# call 1: main (.carry/main-tree) against the branch (GLU backward writes h over dh; the residual path's gradient
# added in the norm's backward kernel): A/B of the step on llama-3-8b bf16:auto and 4bit:offload; one profiled
# bf16:auto step of the branch; the GPU tests of the changed kernels and the fused model
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 170 python3 tools/ab_trees.py .carry/main-tree . --arm bf16:auto --rounds 6 --steps 8 --seconds 150 --out $OUT/ab-glu-norm-bf16-auto.json > $OUT/ab-glu-norm-bf16-auto.log 2>&1; tail -4 $OUT/ab-glu-norm-bf16-auto.log | cut -c1-300; el ab bf16
timeout 190 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 6 --steps 8 --seconds 170 --out $OUT/ab-glu-norm-4bit-offload.json > $OUT/ab-glu-norm-4bit-offload.log 2>&1; tail -4 $OUT/ab-glu-norm-4bit-offload.log | cut -c1-300; el ab 4bit
timeout 80 python3 results/logs/2026-12-02-h200-kernels-top.py bf16:auto llama-3-8b > $OUT/kernels-top-bf16-auto.log 2>&1; head -40 $OUT/kernels-top-bf16-auto.log | cut -c1-200; el profile
L=$(( 590 - SECONDS )); timeout $L python3 -m pytest -m gpu tests/kernels/test_glu.py tests/kernels/test_rms_norm.py tests/fused/test_fused_gpu.py tests/fused/test_lora_functions.py tests/fused/test_offload_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -5 $OUT/gputests.log | cut -c1-300; el tests
