# host µs per launch: our rms_norm op (autograd Function + lookup + Triton run), raw Triton kernel[grid], torch.mul
import time, torch
from fastbench.kernels import rms_norm as R
x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16); w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
y = torch.empty_like(x)
def t(f, n=2000):
    for _ in range(50): f()
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): f()
    h = (time.perf_counter() - s) / n * 1e6; torch.cuda.synchronize(); return h
cfg = dict(R.config_for(R.SPEC, "fwd", R._problem("fwd", x.dtype, 4096, 8)))
from fastbench.kernels._tensors import compute_dtype
def raw():
    R._rms_norm_fwd_kernel[(8 // cfg["BLOCK_ROWS"] or 1,)](x, w, y, 8, 4096, 4096, 4096, 1e-6, 0.0, BLOCK_N=4096, COMPUTE=compute_dtype(x), **cfg)
print(f"rms_norm op {t(lambda: R.rms_norm(x, w)):.1f} us; raw triton launch {t(raw):.1f} us; torch.mul {t(lambda: x * 2):.1f} us; "
      f"mm 8x4096x4096 {t(lambda: x @ x.t()):.1f} us; empty {t(lambda: torch.empty(8, 4096, device='cuda')):.1f} us")
