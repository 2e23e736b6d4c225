# Does compiling cuDNN's attention off the main thread (while the model loads) shorten the main thread's first
# cuDNN attention at the training shape? argv: mode heads kv_heads head_dim [seq batch]
#   none: no warm-up; thread: a thread warms at a small shape while the main thread does host work (loading);
#   thread_exact: the same at the training shape; main: the main thread warms at a small shape first
import json, os, sys, threading, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

mode, H, KV, D = sys.argv[1], *(int(a) for a in sys.argv[2:5])
S, B = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (2048, 2)
t0 = time.perf_counter()
torch.cuda.init()
torch.empty(1, device="cuda")
init_s = time.perf_counter() - t0


def attention(b, s, stream=None):
    """fwd + bwd of causal cuDNN attention in the fused path's layout ([B, T, H, D] transposed)."""
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        q = torch.randn(b, s, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k = torch.randn(b, s, KV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        v = torch.randn(b, s, KV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5, enable_gqa=H != KV)
            o = o.transpose(1, 2).reshape(b, s, -1)
            o.backward(torch.randn_like(o))
        torch.cuda.current_stream().synchronize()


row = {"mode": mode, "H": H, "KV": KV, "D": D, "S": S, "B": B, "init_s": round(init_s, 3),
       "cache": os.environ.get("CUDA_CACHE_PATH", "default")}
if mode in ("thread", "thread_exact", "loadonly"):
    done = {}

    def warm():
        t = time.perf_counter()
        attention(*((B, S) if mode == "thread_exact" else (1, 256)), torch.cuda.Stream())
        done["warm_s"] = time.perf_counter() - t

    t = time.perf_counter()
    th = threading.Thread(target=warm if mode != "loadonly" else lambda: done.update(warm_s=0.0), daemon=True)
    th.start()
    # the main thread meanwhile does loading-like host work: build tensors on the CPU and copy them over
    spent = 0
    while time.perf_counter() - t < 8:
        w = torch.randn(4096, 4096).to(torch.bfloat16)
        w.to("cuda", non_blocking=False)
        spent += 1
    th.join()
    row.update(warm_s=round(done["warm_s"], 3), loading_work_units=spent, window_s=round(time.perf_counter() - t, 3))
elif mode == "main":
    t = time.perf_counter()
    attention(1, 256)
    row["warm_s"] = round(time.perf_counter() - t, 3)
t = time.perf_counter()
attention(B, S)
row["first_s"] = round(time.perf_counter() - t, 3)
t = time.perf_counter()
attention(B, S)
row["second_s"] = round(time.perf_counter() - t, 3)
t = time.perf_counter()
attention(B, S // 2)
row["other_shape_s"] = round(time.perf_counter() - t, 3)
print(json.dumps(row), flush=True)
