# call: the host cost of the 4-bit offload step's products under cuBLAS and cuBLASLt (torch's preferred BLAS
# library), then an A/B of the 4-bit offload step: main (A) against main with cuBLASLt preferred (B, a copy whose
# fastbench/__init__.py sets torch.backends.cuda.preferred_blas_library("cublaslt"))
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
python3 results/logs/2026-12-03-h200-mm-host-cost.py 2>&1 | tee $OUT/mm-host-cost.log; el mm
timeout 170 python3 tools/ab_trees.py .carry/main-tree .carry/lt-tree --arm 4bit:offload --rounds 8 --steps 8 --seconds 155 --out $OUT/ab-cublaslt-4bit-offload.json > $OUT/ab-cublaslt-4bit-offload.log 2>&1; tail -4 $OUT/ab-cublaslt-4bit-offload.log | cut -c1-300; el ab
