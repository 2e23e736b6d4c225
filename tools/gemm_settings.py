"""Probe: do cuBLAS's settings make the fused step's base products faster? The products of llama-3-8b's
layers at 4096 tokens in bf16 (the forward's y.addmm_(x, W^T) after the rank-r term, the backward's
dx.addmm_(dY, W), as the LoRA Functions run them), timed with CUDA events (triton.testing.do_bench) in one fresh
process per setting: torch's preferred BLAS library (cublas, cublaslt) and, for cublasLt, a larger workspace
(CUBLASLT_WORKSPACE_SIZE and CUBLAS_WORKSPACE_CONFIG, read when the process starts). Per setting: each shape's
times and TFLOP/s, and the 32 layers' total; then the projections of one input (Q/K/V, gate/up) as separate
products (as their weights lie now, each its own tensor) against one product over their weights side by side
(for the backward, with the copy that puts Q/K/V's dY's side by side).

    python tools/gemm_settings.py                 # GPU; one child process per setting
"""
import argparse
import os
import subprocess
import sys

SHAPES = [("q/o", 4096, 4096, 2), ("k/v", 1024, 4096, 2), ("gate/up", 14336, 4096, 2), ("down", 4096, 14336, 1)]
GROUPS = [("q/k/v", (4096, 1024, 1024), 4096, True), ("gate/up", (14336, 14336), 4096, False)]
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
    saved = sum(grouped(label, tokens, name, outs, in_f, cat) * layers for name, outs, in_f, cat in GROUPS)
    print(f"{label}: side by side, the {layers} layers' base products take {saved:.1f} ms less", flush=True)


def grouped(label: str, tokens: int, name: str, outs, in_f: int, cat: bool) -> float:
    """Separate products of one input against one over the weights side by side; the ms a layer saves."""
    import torch
    import triton

    kw = dict(device="cuda", dtype=torch.bfloat16)
    Ws, x = [torch.randn(o, in_f, **kw) for o in outs], torch.randn(tokens, in_f, **kw)
    W, ys = torch.cat(Ws), [torch.randn(tokens, o, **kw) for o in outs]
    dYs, y, dY, dx = [torch.randn(tokens, o, **kw) for o in outs], torch.randn(tokens, sum(outs), **kw), \
        torch.randn(tokens, sum(outs), **kw), torch.randn(tokens, in_f, **kw)

    def fwd_separate():
        for yp, Wp in zip(ys, Ws):
            yp.addmm_(x, Wp.t())

    def bwd_separate():
        for dYp, Wp in zip(dYs, Ws):
            dx.addmm_(dYp, Wp)

    def bwd_one():
        dx.addmm_(torch.cat(dYs, 1) if cat else dY, W)

    times = [triton.testing.do_bench(f, warmup=25, rep=300) * 1e3 for f in
             (fwd_separate, lambda: y.addmm_(x, W.t()), bwd_separate, bwd_one)]
    print(f"{label}: {name:8s} forward separate {times[0]:6.1f} us, as one {times[1]:6.1f} us | backward dX separate "
          f"{times[2]:6.1f} us, as one {times[3]:6.1f} us{' (dY copied side by side)' if cat else ''}", flush=True)
    return (times[0] - times[1] + times[2] - times[3]) / 1e3


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
