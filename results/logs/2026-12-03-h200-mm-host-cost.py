# host time to issue one product of the 4-bit offload step's shapes (llama-3-8b, 4096 tokens, r=16), cuBLAS against
# cuBLASLt as torch's preferred BLAS library: 50 calls issued back to back (the GPU far behind, so nothing waits),
# host time per call, median of 7 blocks; the GPU synchronised between blocks
import statistics, time, torch
import torch.nn.functional as F

bf = dict(device="cuda", dtype=torch.bfloat16)
N, H, I, R = 4096, 4096, 14336, 16
x, xa, g = torch.randn(N, H, **bf), torch.randn(N, R, **bf), torch.randn(N, I, **bf)
W, Wd, A, B, Bd = torch.randn(I, H, **bf), torch.randn(H, I, **bf), torch.randn(R, H, **bf), torch.randn(I, R, **bf), torch.randn(H, R, **bf)
y = torch.empty(N, I, **bf)
cases = {
    "x A^T (F.linear, [4096,4096]x[4096,16])": lambda: F.linear(x, A),
    "(xA^T) B^T ([4096,16]x[16,14336])": lambda: torch.mm(xa, B.t()),
    "y.addmm_(x, W^T) ([4096,4096]x[4096,14336])": lambda: y.addmm_(x, W.t()),
    "dY B ([4096,14336]x[14336,16])": lambda: torch.mm(g, B),
    "dB = dY^T (xA^T) fp32 out ([14336,4096]x[4096,16])": lambda: torch.mm(g.t(), xa, out_dtype=torch.float32),
    "dX = dY W ([4096,14336]x[14336,4096])": lambda: torch.mm(g, W),
}
for lib in ("cublas", "cublaslt"):
    torch.backends.cuda.preferred_blas_library(lib)
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                fn()
            times.append((time.perf_counter() - t) / 50 * 1e6)
        torch.cuda.synchronize()
        print(f"{lib:9s} {name:52s} host {statistics.median(times):6.1f} us/call (min {min(times):.1f})", flush=True)
