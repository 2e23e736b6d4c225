"""GPU vs CPU k-quant choices over several fresh inputs: error ratio, and the share of rows, 256-blocks and
16-value groups whose decoded values differ."""
import os, torch, gguf
from fastbench.export.kquants import quantize_k
deq = lambda d, k: torch.from_numpy(gguf.quants.dequantize(d.numpy(), gguf.GGMLQuantizationType[k]).copy())
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
for k in ["Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
    for _ in range(4):
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        x = torch.randn(64, 4096) * 0.02
        c, g = deq(quantize_k(x, k), k), deq(quantize_k(x.cuda(), k).cpu(), k)
        diff = g != c
        print(k, f"err ratio {rel(g, x) / rel(c, x):.6f} rows {diff.any(-1).float().mean():.3f} "
              f"blocks {diff.reshape(-1, 256).any(-1).float().mean():.4f} groups16 {diff.reshape(-1, 16).any(-1).float().mean():.5f}")
