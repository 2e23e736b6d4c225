# host cost of one Triton launch: kernel[grid](...) (JITFunction.run) against the compiled kernel's launcher called
# directly with the same arguments, and against fastbench.kernels._launch.launch where this tree has it; beside it torch.mm / F.linear / an elementwise op on tiny tensors (host-bound)
import time, torch, triton, triton.language as tl
import torch.nn.functional as F


@triton.jit
def _axpy(x_ptr, y_ptr, out_ptr, n, stride, alpha, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, tl.load(x_ptr + i * stride, mask=m) * alpha + tl.load(y_ptr + i, mask=m), mask=m)


def per_call_us(fn, n=20000, rounds=5):
    best = []
    for _ in range(rounds):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize(); best.append((time.perf_counter() - t) / n * 1e6)
    return min(best), sorted(best)[len(best) // 2]


x, y, out = (torch.randn(4096, device="cuda") for _ in range(3))
args = (x, y, out, 4096, 1, 0.5)
kw = dict(BLOCK=1024, EVEN=True)
grid = (4,)
compiled = _axpy[grid](*args, **kw)
names = _axpy.arg_names
full = [dict(zip(names, args), **kw)[name] for name in names]
dev = torch.cuda.current_device()
from triton.runtime import driver
stream = driver.active.get_current_stream(dev)


def direct():
    compiled.run(4, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *full)


def direct_stream():
    compiled.run(4, 1, 1, driver.active.get_current_stream(dev), compiled.function, compiled.packed_metadata, None,
                 None, None, *full)


direct(); torch.cuda.synchronize()
ref = x * 0.5 + y
assert torch.allclose(out, ref), "direct launch wrote something else"
out.zero_(); direct(); torch.cuda.synchronize(); assert torch.allclose(out, ref)
a, b = torch.randn(8, 8, device="cuda"), torch.randn(8, 8, device="cuda")
print(f"triton {triton.__version__} torch {torch.__version__}")
cases = []
try:
    from fastbench.kernels._launch import launch
    out.zero_(); launch(_axpy, grid, *args, **kw); launch(_axpy, grid, *args, **kw); torch.cuda.synchronize()
    assert torch.allclose(out, ref), "launch() wrote something else"
    cases.append(("fastbench launch()", lambda: launch(_axpy, grid, *args, **kw)))
except ImportError:
    pass
for name, fn in cases + [("kernel[grid](...)", lambda: _axpy[grid](*args, **kw)), ("launcher direct", direct),
                 ("launcher direct + current stream", direct_stream), ("torch.mm 8x8", lambda: torch.mm(a, b)),
                 ("F.linear 8x8", lambda: F.linear(a, b)), ("a.add_(b)", lambda: a.add_(b)),
                 ("x.view(64, 64)", lambda: x.view(64, 64)), ("x[:2048]", lambda: x[:2048]),
                 ("a.t()", lambda: a.t()), ("torch.empty_like(x)", lambda: torch.empty_like(x))]:
    lo, med = per_call_us(fn)
    print(f"{name:36s} {lo:6.2f} us (median of rounds {med:6.2f})", flush=True)
