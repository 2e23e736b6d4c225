# call 2 (branch rope-token-tiles): the RoPE kernel rotates a tile of tokens per program where heads are narrow
# (one token per program, as before, for the families' head sizes); its source changed, so its bundled configs are
# re-tuned and merged, the shipped compiled kernels collected again, then the GPU tests of RoPE, of the compiled
# cache and of the fused model
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
export FASTBENCH_CACHE_DIR=$HOME/tune-cache
B=autotune/bundled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.json
cp $B $OUT/bundled-before.json
timeout 280 fastbench tune --ops rope --models llama-3-8b,mistral-7b,gemma-7b,qwen2.5-7b,qwen3-8b --jobs 14 --max-time 200 --json-out $OUT/tune-rope.json > $OUT/tune-rope.log 2>&1; tail -3 $OUT/tune-rope.log | cut -c1-300; el tune
fastbench tune --export $OUT/exported.json > /dev/null 2>&1 && python3 results/logs/2026-12-03-merge-bundled.py $B $OUT/exported.json && cp $B $OUT/; el merge
unset FASTBENCH_CACHE_DIR
timeout 200 python3 tools/collect_compile_cache.py > $OUT/collect.log 2>&1; tail -2 $OUT/collect.log | cut -c1-300; cp autotune/bundled/compiled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.* $OUT/; el collect
L=$(( 585 - SECONDS )); timeout $L python3 -m pytest -m gpu tests/kernels/test_rope.py tests/autotune/test_compiled_cache_gpu.py tests/fused/test_fused_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -4 $OUT/gputests.log | cut -c1-300; el tests
