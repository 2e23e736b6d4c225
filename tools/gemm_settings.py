"""Probe: do cuBLAS's settings make the fused step's base products faster? The products of llama-3-8b's
layers at 4096 tokens in bf16 (the forward's y.addmm_(x, W^T) after the rank-r term, the backward's
dx.addmm_(dY, W), as the LoRA Functions run them), timed with CUDA events (triton.testing.do_bench) in one fresh
process per setting: torch's preferred BLAS library (cublas, cublaslt) and, for cublasLt, a larger workspace
(CUBLASLT_WORKSPACE_SIZE and CUBLAS_WORKSPACE_CONFIG, read when the process starts). Per setting: each shape's
times and TFLOP/s, and the 32 layers' total.

    python tools/gemm_settings.py                 # GPU; one child process per setting
"""
import argparse
import os
import subprocess
import sys

SHAPES = [("q/o", 4096, 4096, 2), ("k/v", 1024, 4096, 2), ("gate/up", 14336, 4096, 2), ("down", 4096, 14336, 1)]
SETTINGS = [("cublas", {}), ("cublaslt", {}),
            ("cublaslt", {"CUBLASLT_WORKSPACE_SIZE": "262144", "CUBLAS_WORKSPACE_CONFIG": ":262144:2"})]


def child(library: str, tokens: int, layers: int) -> None:
    import torch
    import triton

    torch.backends.cuda.preferred_blas_library(library)
    torch.manual_seed(0)
    total = 0.0
    label = library + "".join(f" {k}={os.environ[k]}" for k in ("CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_CONFIG")
                              if k in os.environ)
    for name, out_f, in_f, per_layer in SHAPES:
        kw = dict(device="cuda", dtype=torch.bfloat16)
        W, x, dY = torch.randn(out_f, in_f, **kw), torch.randn(tokens, in_f, **kw), torch.randn(tokens, out_f, **kw)
        y, dx = torch.randn(tokens, out_f, **kw), torch.randn(tokens, in_f, **kw)
        flop = 2 * tokens * out_f * in_f
        fwd = triton.testing.do_bench(lambda: y.addmm_(x, W.t()), warmup=25, rep=300)
        bwd = triton.testing.do_bench(lambda: dx.addmm_(dY, W), warmup=25, rep=300)
        total += per_layer * layers * (fwd + bwd)
        print(f"{label}: {name:8s} [{out_f}x{in_f}] forward {fwd * 1e3:6.1f} us {flop / fwd / 1e9:4.0f} TFLOP/s | "
              f"backward dX {bwd * 1e3:6.1f} us {flop / bwd / 1e9:4.0f} TFLOP/s", flush=True)
    print(f"{label}: the {layers} layers' base products (forward + dX) {total:.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.layers)
        return
    for library, env in SETTINGS:
        subprocess.run([sys.executable, __file__, "--child", library, "--tokens", str(args.tokens),
                        "--layers", str(args.layers)], env={**os.environ, **env}, check=False)


if __name__ == "__main__":
    main()
