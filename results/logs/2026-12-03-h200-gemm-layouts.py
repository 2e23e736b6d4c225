# The fused step's base products in both operand layouts (llama-3-8b, 4096 tokens, bf16): the backward's
# dX = dY W with W [out, in] as stored (cuBLAS "NN": the reduction runs along W's rows) against the same product
# from a transposed copy W^T [in, out] (K-major, "TN", as the forward's x W^T), each as addmm_ into an output
# holding the rank-r term (beta = 1) as the LoRA Functions run them; the forward's x W^T beside; CUDA-event medians
import torch, triton
torch.manual_seed(0)
M = 4096
rows = []
for name, out_f, in_f in [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336),
                          ("qkv side by side", 6144, 4096), ("gate+up side by side", 28672, 4096)]:
    W = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    Wt = W.t().contiguous()
    x = torch.randn(M, in_f, device="cuda", dtype=torch.bfloat16)
    dY = torch.randn(M, out_f, device="cuda", dtype=torch.bfloat16)
    y, dx = torch.randn(M, out_f, device="cuda", dtype=torch.bfloat16), torch.randn(M, in_f, device="cuda", dtype=torch.bfloat16)
    fl = 2 * M * out_f * in_f
    t_fwd = triton.testing.do_bench(lambda: y.addmm_(x, W.t()), warmup=25, rep=300)
    t_nn = triton.testing.do_bench(lambda: dx.addmm_(dY, W), warmup=25, rep=300)
    t_tn = triton.testing.do_bench(lambda: dx.addmm_(dY, Wt.t()), warmup=25, rep=300)
    t_nn0 = triton.testing.do_bench(lambda: torch.mm(dY, W), warmup=25, rep=300)
    t_tn0 = triton.testing.do_bench(lambda: torch.mm(dY, Wt.t()), warmup=25, rep=300)
    print(f"{name:22s} [{out_f}x{in_f}]: fwd x W^T {t_fwd*1e3:6.1f} us {fl/t_fwd/1e9:5.0f} TF/s | dX addmm_ as stored (NN) "
          f"{t_nn*1e3:6.1f} us {fl/t_nn/1e9:5.0f} | from W^T copy (TN) {t_tn*1e3:6.1f} us {fl/t_tn/1e9:5.0f} | mm NN {t_nn0*1e3:6.1f} "
          f"TN {t_tn0*1e3:6.1f} us", flush=True)
