# summary of a py-spy raw file (--native --threads --idle) of tools/first_step_breakdown.py --only-first: the
# samples of the first step (main thread inside phases(), every sample of the other threads but the autograd
# engine's idle waits), counted once each under the first category whose frame they hold
import collections, gzip, re, sys

CATEGORIES = [("cuDNN attention graph: NVRTC compile", "nvrtcCompileProgram"),
              ("cuDNN attention graph: other finalize/build", "cudnn::backend::finalizeDescriptor"),
              ("cuDNN attention graph: other build", "at::native::build_graph"),
              ("Triton's compiler hash (triton_key)", "triton_key ("),
              ("Triton's cache lookup and load, other", "JITFunction._do_compile"),
              ("CUDA module loads (cuLibraryLoadData)", "cuLibraryLoadData"),
              ("cuBLAS(Lt) heuristics and init", "cublasLt"),
              ("dlopen", "dlopen"),
              ("main thread waits for the autograd thread", "torch::autograd::python::PythonEngine::execute"),
              ("autograd thread idle", "torch::autograd::ReadyQueue::pop")]
lines = [(m.group(1), int(m.group(2))) for m in (re.match(r"^(.*) (\d+)$", l.rstrip()) for l in gzip.open(sys.argv[1], "rt")) if m]
main = {s.split(";")[0] for s, _ in lines if "<module> (" in s}
count, total = collections.Counter(), 0
for s, n in lines:
    head = s.split(";")[0]
    if head in main or head.split(")")[0] + ")" in {m.split(")")[0] + ")" for m in main}:
        if "phases (" not in s:
            continue
    total += n
    count[next((name for name, frame in CATEGORIES if frame in s), "other")] += n
idle = count["autograd thread idle"] + count["main thread waits for the autograd thread"]
print(f"{sys.argv[1]}: {total} samples in the first step, {total - idle} busy (100 Hz, under py-spy's slowdown)")
for name, n in count.most_common():
    print(f"  {n:6d}  {100 * n / (total - idle) if 'idle' not in name and 'waits' not in name else float('nan'):5.1f}% of busy  {name}")
