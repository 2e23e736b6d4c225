# call 1: cuDNN attention warmed off the main thread: empty (CUDA_CACHE_PATH new) and filled driver caches
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
W=.carry/cudnn_warm.py; L=$OUT/cudnn-warm.jsonl
r() { timeout 120 python3 $W "$@" >> $L 2>>$OUT/warm.err; tail -1 $L; }
for dims in "16 16 256" "32 8 128"; do
  CUDA_CACHE_PATH=/tmp/c-$RANDOM r none $dims
  CUDA_CACHE_PATH=/tmp/c-$RANDOM r thread $dims
  CUDA_CACHE_PATH=/tmp/c-$RANDOM r main $dims
  r none $dims   # fills the default cache
  r none $dims
  r thread $dims
  r thread_exact $dims
  r main $dims
  r loadonly $dims
done
echo "[${SECONDS} s] done"
