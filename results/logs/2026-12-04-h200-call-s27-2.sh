# call 2: fastbench compare at main with the GPU's energy, power, clock and power-limit time recorded per process:
# llama-3-8b fused-4bit offload beside Unsloth QLoRA (2 processes each), bf16 fused auto beside Unsloth LoRA,
# then mistral-7b fused-4bit offload beside Unsloth QLoRA as time allows
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
nvidia-smi --query-gpu=power.limit,power.default_limit,power.max_limit,clocks.max.sm --format=csv
C="--warmup 2 --steps 20 --timeout 150 --seq-len 2048 --batch 2"
G='^\| |^ok|^FAIL|^- ok|ratio'
timeout 290 fastbench compare --models llama-3-8b --repeats 2 $C --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-4bit.log 2>&1; grep -E "$G" $OUT/compare-4bit.log | cut -c1-300; el 4bit
timeout 150 fastbench compare --models llama-3-8b --repeats 1 $C --arms fused:ckpt=auto,unsloth --baseline-arm unsloth --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-bf16.log 2>&1; grep -E "$G" $OUT/compare-bf16.log | cut -c1-300; el bf16
L=$(( 570 - SECONDS )); [ $L -gt 100 ] && timeout $L fastbench compare --models mistral-7b --repeats 1 $C --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-mistral.log 2>&1; grep -E "$G" $OUT/compare-mistral.log | cut -c1-300; el mistral
rm -f $OUT/r/*.png $OUT/rep/*.png
