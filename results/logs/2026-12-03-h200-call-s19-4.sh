# call 4: main (the GLU h and norm residual changes, the new shipped compiled kernels) beside Unsloth LoRA on
# llama-3-8b, bf16 fused:ckpt=auto, one process each
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
C="--models llama-3-8b --repeats 1 --warmup 2 --steps 10 --timeout 150 --seq-len 2048 --batch 2"
timeout 280 fastbench compare $C --arms fused:ckpt=auto,unsloth --baseline-arm unsloth --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-bf16.log 2>&1; grep -E "^\| |^ok|^FAIL" $OUT/compare-bf16.log | cut -c1-250; echo "[${SECONDS} s]"; rm -f $OUT/r/*.png $OUT/rep/*.png
