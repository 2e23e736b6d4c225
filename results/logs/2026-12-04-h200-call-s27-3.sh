# call 3: fastbench compare with the GPU's energy and power recorded: qwen2.5-7b and qwen3-8b fused-4bit offload
# beside Unsloth QLoRA, gemma-7b fused-4bit offload alone (Unsloth fails on it), one process each; only the
# results files come back
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
el() { echo "[${SECONDS} s] $*"; }
C="--repeats 1 --warmup 2 --steps 20 --timeout 150 --seq-len 2048 --batch 2 --results-dir $OUT/r --reports-dir $OUT/rep"
G='^\| [a-z]|^ok|^FAIL'
timeout 190 fastbench compare --models qwen2.5-7b $C --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora > $OUT/qwen25.log 2>&1; grep -E "$G" $OUT/qwen25.log | cut -c1-260; el qwen2.5
timeout 190 fastbench compare --models qwen3-8b $C --arms fused-4bit:ckpt=offload,unsloth-qlora --baseline-arm unsloth-qlora > $OUT/qwen3.log 2>&1; grep -E "$G" $OUT/qwen3.log | cut -c1-260; el qwen3
L=$(( 540 - SECONDS )); [ $L -gt 60 ] && timeout $L fastbench compare --models gemma-7b $C --arms fused-4bit:ckpt=offload > $OUT/gemma.log 2>&1; grep -E "$G" $OUT/gemma.log | cut -c1-260; el gemma
rm -rf $OUT/rep $OUT/r/*.csv $OUT/r/*.png; cat $OUT/qwen25.log $OUT/qwen3.log $OUT/gemma.log > $OUT/compare-families.log 2>/dev/null; rm -f $OUT/qwen25.log $OUT/qwen3.log $OUT/gemma.log; ls $OUT $OUT/r
