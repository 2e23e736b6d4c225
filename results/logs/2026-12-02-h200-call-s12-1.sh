# call 1 (<= 575 s from the script's start): the GPU suite without the benchmarks; llama-3-8b fused-4bit:ckpt=auto
# beside Unsloth QLoRA (one process each), the first figure since the host-overhead changes.
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider --tb=short > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el gputests
export PYTORCH_ALLOC_CONF=expandable_segments:True
L=$(( 570 - SECONDS )); timeout $L fastbench compare --models llama-3-8b --arms fused-4bit:ckpt=auto,unsloth-qlora --baseline-arm unsloth-qlora --repeats 1 --warmup 2 --steps 8 --timeout 150 --seq-len 2048 --batch 2 --profile --results-dir $OUT/r --reports-dir $OUT/rep > $OUT/compare-auto4.log 2>&1
grep -E "^\| |rror" $OUT/compare-auto4.log | cut -c1-230 | tail -6; rm -f $OUT/r/*.csv
el all done
