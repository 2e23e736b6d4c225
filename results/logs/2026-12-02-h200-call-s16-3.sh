# call 3: where the bf16 auto step's time goes on llama-3-8b: kernels by name; the GPU's waits for the host
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
timeout 200 python3 .carry/kernels_top.py bf16:auto llama-3-8b > $OUT/kernels-top-bf16-auto.log 2>&1; grep -v Loading $OUT/kernels-top-bf16-auto.log | head -60 | cut -c1-230; el kernels
cd tools && timeout 200 python3 gpu_gaps.py bf16:auto > $OUT/gpu-gaps-bf16-auto.log 2>&1; grep -v Loading $OUT/gpu-gaps-bf16-auto.log | tail -30 | cut -c1-230; el gaps
