# call 1: two branches against main. dy (.carry/dy-tree): both products of each LoRA dY from one read; this tree
# (glu-low-rank): gate/up's LoRA terms and dh's rank-r part added inside the GLU kernels. GPU tests of both,
# the dy kernel against cuBLAS, A/B of the step of each against main; cuBLAS backend/workspace probe
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 150 python3 -m pytest -m gpu tests/kernels/test_glu.py tests/fused/test_lora_functions.py tests/fused/test_fused_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests-glu.log 2>&1; tail -3 $OUT/gputests-glu.log | cut -c1-300; el tests glu
python3 -c "import sys; sys.path.insert(0, 'tools'); import ab_trees; ab_trees._link('.carry/dy-tree', '/tmp/dy')"
(cd .carry/dy-tree && PYTHONPATH=/tmp/dy:$PYTHONPATH timeout 100 python3 -m pytest -m gpu tests/kernels/test_dy_products.py tests/fused/test_lora_functions.py -p no:cacheprovider -q --tb=short > $OUT/gputests-dy.log 2>&1; tail -3 $OUT/gputests-dy.log | cut -c1-300
PYTHONPATH=/tmp/dy:$PYTHONPATH timeout 100 python3 tools/dy_products_bench.py --model llama-3-8b --tokens 4096 --rank 16 --sweep > $OUT/bench-dy.log 2>&1; cut -c1-330 $OUT/bench-dy.log); el dy
for b in glu:. dy:.carry/dy-tree; do timeout 75 python3 tools/ab_trees.py .carry/main-tree ${b#*:} --arm bf16:auto --rounds 6 --steps 8 --seconds 70 --out $OUT/ab-${b%%:*}-bf16-auto.json > $OUT/ab-${b%%:*}-bf16-auto.log 2>&1; tail -2 $OUT/ab-${b%%:*}-bf16-auto.log | cut -c1-300; el ab ${b%%:*}; done
timeout 120 python3 tools/ab_trees.py .carry/main-tree . --arm 4bit:offload --rounds 6 --steps 8 --seconds 115 --out $OUT/ab-glu-4bit-offload.json > $OUT/ab-glu-4bit-offload.log 2>&1; tail -2 $OUT/ab-glu-4bit-offload.log | cut -c1-300; el ab glu 4bit
G=results/logs/2026-12-03-h200-gemm-backends.py; L=$(( (580 - SECONDS) / 3 ))
(timeout $L python3 $G cublas; timeout $L python3 $G cublaslt; CUBLASLT_WORKSPACE_SIZE=262144 CUBLAS_WORKSPACE_CONFIG=:262144:2 timeout $L python3 $G cublaslt) > $OUT/gemm-backends.log 2>&1; grep ms $OUT/gemm-backends.log; el gemm
