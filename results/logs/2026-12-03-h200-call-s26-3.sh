# call 3 (branch rope-token-tiles): the RoPE kernel before and after in one process at the bundled configs (the
# re-tune of call 2 timed the new kernel slower at small sizes, on a GPU whose clocks had just left idle); then,
# on the warmed GPU, RoPE re-tuned again (llama-3.2-1b's head size too), merged into the bundled configs, the
# shipped compiled kernels collected again, and the GPU tests of RoPE, the compiled cache and the fused model
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
B=autotune/bundled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.json
mkdir -p $OUT/bundled $OUT/compiled
timeout 150 python3 results/logs/2026-12-03-h200-rope-ab.py .carry/main-tree .carry/bundled-before.json > $OUT/rope-ab.log 2>&1; cut -c1-200 $OUT/rope-ab.log; el ab
export FASTBENCH_CACHE_DIR=$HOME/tune-cache
timeout 200 fastbench tune --ops rope --models llama-3-8b,llama-3.2-1b,mistral-7b,gemma-7b,qwen2.5-7b,qwen3-8b --jobs 14 --max-time 150 --json-out $OUT/tune-rope.json > $OUT/tune-rope.log 2>&1; tail -3 $OUT/tune-rope.log | cut -c1-300; el tune
fastbench tune --export $OUT/exported.json > /dev/null 2>&1 && cp .carry/bundled-before.json $B && python3 results/logs/2026-12-03-merge-bundled.py $B $OUT/exported.json && cp $B $OUT/bundled/; el merge
unset FASTBENCH_CACHE_DIR
timeout 150 python3 tools/collect_compile_cache.py > $OUT/collect.log 2>&1; tail -1 $OUT/collect.log | cut -c1-300; cp autotune/bundled/compiled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.* $OUT/compiled/; el collect
L=$(( 585 - SECONDS )); timeout $L python3 -m pytest -m gpu tests/kernels/test_rope.py tests/autotune/test_compiled_cache_gpu.py tests/fused/test_fused_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el tests
