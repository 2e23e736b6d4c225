# call 4 (branch rope-token-tiles, with the re-tuned RoPE configs of call 3 merged into the bundled file): the
# shipped compiled kernels collected again (call 3's archive did not come back), then the compiled-cache GPU test
# (a fresh process with the archive installed compiles nothing) and the RoPE GPU tests
source .carry/setup.sh
el() { echo "[${SECONDS} s] $*"; }
timeout 200 python3 tools/collect_compile_cache.py > $OUT/collect.log 2>&1; tail -1 $OUT/collect.log | cut -c1-300; cp autotune/bundled/compiled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.tar.xz $OUT/; cp autotune/bundled/compiled/h200-sm90-132sm__triton-3.6.0__cuda-13.0.json $OUT/manifest.json; el collect
timeout 300 python3 -m pytest -m gpu tests/autotune/test_compiled_cache_gpu.py tests/kernels/test_rope.py -p no:cacheprovider -q --tb=short > $OUT/gputests.log 2>&1; tail -3 $OUT/gputests.log | cut -c1-300; el tests
