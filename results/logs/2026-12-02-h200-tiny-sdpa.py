# cuDNN attention forward and backward at a tiny shape (argv: heads head_dim seq): does it fill the driver's JIT
# cache for the model's real shape?
import sys, time, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
H, D, S = (int(a) for a in sys.argv[1:4])
t = time.perf_counter()
q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)
    o.backward(torch.randn_like(o))
torch.cuda.synchronize()
print(f"tiny cuDNN attention H={H} D={D} S={S}: {time.perf_counter() - t:.2f} s", flush=True)
