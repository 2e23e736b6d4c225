# summary of a py-spy raw file recorded with --threads while attached to steps only: every sample counts. Prints the
# samples per thread, self time by leaf frame, inclusive time by frame, and (native files) the leaf's library:
# the CUDA driver, torch's C++ libraries, the Python interpreter, Python code, Triton's launcher, other
import collections, gzip, re, sys

path = sys.argv[1]
lines = [m.groups() for m in (re.match(r"^(.*) (\d+)$", l.rstrip()) for l in (gzip.open if path.endswith(".gz") else open)(path, "rt")) if m]


def library(frame: str) -> str:
    inner = frame[frame.rfind("(") + 1:].rstrip(")")
    if ".py:" in inner or inner.startswith("<frozen"):
        return "Python code"
    for needle, name in (("libcuda", "CUDA driver"), ("libcudart", "CUDA runtime"), ("libcublas", "cuBLAS"),
                         ("libtorch_python", "torch Python bindings"), ("libtorch_cuda", "torch C++ (CUDA)"),
                         ("libtorch_cpu", "torch C++ (CPU, dispatcher, autograd)"), ("libc10", "torch c10"),
                         ("libpython", "Python interpreter"), ("python3", "Python interpreter"),
                         ("cuda_utils", "Triton launcher"), ("__triton_launcher", "Triton launcher"),
                         ("libc.so", "libc"), ("libstdc++", "libstdc++")):
        if needle in inner:
            return name
    return "other: " + inner.split("/")[-1][:40]


threads, selfc, incl, libs, total = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter(), 0
for stack, n in lines:
    n = int(n); total += n
    frames = stack.split(";")
    threads[frames[0]] += n
    selfc[frames[-1]] += n
    libs[library(frames[-1])] += n
    for f in set(frames[1:]):
        incl[f] += n
print(f"samples: {total}")
print("threads:"); [print(f"  {100 * v / total:5.1f}%  {k[:100]}") for k, v in threads.most_common(8)]
print("leaf library:"); [print(f"  {100 * v / total:5.1f}%  {k}") for k, v in libs.most_common(20)]
print("self:"); [print(f"  {100 * v / total:5.1f}%  {k[:160]}") for k, v in selfc.most_common(45)]
print("inclusive:"); [print(f"  {100 * v / total:5.1f}%  {k[:160]}") for k, v in incl.most_common(90)]
