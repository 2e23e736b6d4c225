# call 3 (code 2d98e5a): the base products in both operand layouts; rms_norm re-tuned (its backward kernel changed,
# so its bundled entries no longer match) and merged into the bundled configs; the shipped compiled kernels
# collected again for the changed kernels; the compiled-cache GPU test
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
timeout 90 python3 results/logs/2026-12-03-h200-gemm-layouts.py > $OUT/gemm-layouts.log 2>&1; cat $OUT/gemm-layouts.log | cut -c1-300; el layouts
export FASTBENCH_CACHE_DIR=$HOME/tune-cache
B=autotune/bundled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.json
timeout 300 fastbench tune --ops rms_norm --models llama-3-8b,mistral-7b,gemma-7b,qwen2.5-7b,qwen3-8b --jobs 14 --max-time 200 --json-out $OUT/tune-rms-norm.json > $OUT/tune-rms-norm.log 2>&1; tail -3 $OUT/tune-rms-norm.log | cut -c1-300; el tune
fastbench tune --export $OUT/exported.json > /dev/null 2>&1 && python3 results/logs/2026-12-03-merge-bundled.py $B $OUT/exported.json && cp $B $OUT/; el merge
unset FASTBENCH_CACHE_DIR
timeout 200 python3 tools/collect_compile_cache.py > $OUT/collect.log 2>&1; tail -2 $OUT/collect.log | cut -c1-300; cp autotune/bundled/compiled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.* $OUT/; el collect
L=$(( 580 - SECONDS )); timeout $L python3 -m pytest -m gpu tests/autotune/test_compiled_cache_gpu.py -p no:cacheprovider -q --tb=short > $OUT/gputest-compiled.log 2>&1; tail -3 $OUT/gputest-compiled.log | cut -c1-300; el test
