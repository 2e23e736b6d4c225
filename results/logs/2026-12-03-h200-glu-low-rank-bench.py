# The fused MLP's GLU at llama-3-8b's shapes (4096 tokens, width 14336, LoRA rank 16, bf16): what the rank-r
# terms cost as products (main: (x A^T) s B^T written into gate and up before the base products add to them, and
# (s dY B) A written into dh before dY W adds to it) against the GLU kernels adding them as they read their
# operands (fwd_low_rank, bwd_low_rank) at the served config and the candidates of 4 or 8 warps and 2048+ elements
# (FMA outer products, DOT False, and tl.dot; argv "served": the served configs only); CUDA-event medians
import sys, torch, triton
from fastbench.kernels import _glu, swiglu
M, I, r = 4096, 14336, 16
dt = dict(device="cuda", dtype=torch.bfloat16)
torch.manual_seed(0)
g, u, dh, h = (torch.randn(M, I, **dt) for _ in range(4))
xA, dyB = torch.randn(M, 2 * r, **dt), torch.randn(M, r, **dt)
Bg, Bu, A = torch.randn(I, r, **dt), torch.randn(I, r, **dt), torch.randn(r, I, **dt)
terms = (_glu.LowRank(xA[:, :r], Bg), _glu.LowRank(xA[:, r:], Bu))
dterm = _glu.LowRank(dyB, A.t())
bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200) * 1e3
base_f = bench(lambda: swiglu.swiglu_forward(g, u))
prod_f = bench(lambda: (torch.mm(xA[:, :r], Bg.t()), torch.mm(xA[:, r:], Bu.t())))
base_b = bench(lambda: swiglu.swiglu_backward(dh, g, u, h=h))
prod_b = bench(lambda: torch.mm(dyB, A))
print(f"fwd: GLU {base_f:.1f} us + the two rank-r products {prod_f:.1f} us = {base_f + prod_f:.1f} us | "
      f"GLU with terms (served) {bench(lambda: swiglu.swiglu_forward(g, u, low_rank=terms)):.1f} us", flush=True)
print(f"bwd: GLU {base_b:.1f} us + dh's rank-r product {prod_b:.1f} us = {base_b + prod_b:.1f} us | GLU with terms "
      f"(served) {bench(lambda: swiglu.swiglu_backward(dh, g, u, h=h, low_rank=terms, grad_low_rank=dterm)):.1f} us",
      flush=True)
for pass_name in ("fwd_low_rank", "bwd_low_rank") if sys.argv[1:] != ["served"] else ():
    times = []
    for c in _glu.CANDIDATES[pass_name]:
        if c["num_warps"] not in (4, 8) or c["BLOCK_M"] * c["BLOCK_N"] < 2048:  # a share of them: a call's time
            continue
        if pass_name == "fwd_low_rank":
            t = bench(lambda: _glu.forward(g, u, "silu", c, terms))
        else:
            t = bench(lambda: _glu.backward(dh, g, u, "silu", c, h=h, low_rank=terms, grad_low_rank=dterm))
        times.append((t, c))
    for t, c in sorted(times, key=lambda tc: tc[0])[:8]:
        print(f"{pass_name}: {t:7.1f} us {c}", flush=True)
print(f"bwd (served configs): gate/up terms only {bench(lambda: swiglu.swiglu_backward(dh, g, u, h=h, low_rank=terms)):.1f} us"
      f" | dh's term only {bench(lambda: swiglu.swiglu_backward(dh, g, u, h=h, grad_low_rank=dterm)):.1f} us", flush=True)
