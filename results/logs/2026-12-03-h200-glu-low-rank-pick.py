# The GLU with rank-r terms (llama-3-8b: 4096 tokens, width 14336, rank 16, bf16) at a few configs of each kind
# (FMA outer products, DOT False; tl.dot, DOT True), against main's rank-r products + GLU; the fastest of each
# pass written into kernels/_glu.py's _LOW_RANK_TILES (this copy of the tree: what the A/B after it measures);
# CUDA-event medians. argv: nothing
import json, re, torch, triton
from fastbench.kernels import _glu, swiglu
M, I, r = 4096, 14336, 16
dt = dict(device="cuda", dtype=torch.bfloat16)
torch.manual_seed(0)
g, u, dh, h = (torch.randn(M, I, **dt) for _ in range(4))
xA, dyB = torch.randn(M, 2 * r, **dt), torch.randn(M, r, **dt)
Bg, Bu, A = torch.randn(I, r, **dt), torch.randn(I, r, **dt), torch.randn(r, I, **dt)
terms, dterm = (_glu.LowRank(xA[:, :r], Bg), _glu.LowRank(xA[:, r:], Bu)), _glu.LowRank(dyB, A.t())
bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=150) * 1e3
base_f = bench(lambda: swiglu.swiglu_forward(g, u)) + bench(lambda: (torch.mm(xA[:, :r], Bg.t()), torch.mm(xA[:, r:], Bu.t())))
base_b = bench(lambda: swiglu.swiglu_backward(dh, g, u, h=h)) + bench(lambda: torch.mm(dyB, A))
print(f"main: fwd GLU + two rank-r products {base_f:.1f} us | bwd GLU + dh's rank-r product {base_b:.1f} us", flush=True)
tiles = [(1, 4096, 8), (2, 2048, 8), (4, 1024, 8), (8, 512, 8), (8, 1024, 8), (16, 256, 8), (16, 512, 8), (8, 256, 4),
         (16, 256, 4)]
configs = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": 1, "DOT": False} for m, n, w in tiles]
configs += [{"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 2, "num_stages": 1, "DOT": True},
            {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1, "DOT": True}]
best = {}
for pass_name in ("fwd_low_rank", "bwd_low_rank"):
    for c in configs:
        assert c in _glu.CANDIDATES[pass_name], c
        t = bench((lambda: _glu.forward(g, u, "silu", c, terms)) if pass_name == "fwd_low_rank" else
                  (lambda: _glu.backward(dh, g, u, "silu", c, h=h, low_rank=terms, grad_low_rank=dterm)))
        print(f"{pass_name}: {t:7.1f} us {c}", flush=True)
        if pass_name not in best or t < best[pass_name][0]:
            best[pass_name] = (t, c)
print("fastest:", json.dumps(best), flush=True)
path = "kernels/_glu.py"
src = open(path).read()
src = re.sub(r"^_LOW_RANK_TILES = .*$", "_LOW_RANK_TILES = " + repr({k: v[1] for k, v in best.items()}), src, flags=re.M)
open(path, "w").write(src)
