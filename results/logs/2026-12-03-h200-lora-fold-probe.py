# The LoRA rank-r terms folded into the base products' reduction (llama-3-8b, 4096 tokens, bf16, r=16), against the
# products as the fused Functions run them now; CUDA-event medians (triton.testing.do_bench).
#   forward now:   y = (x A^T) (s B)^T, then y += x W^T (cuBLAS beta = 1)
#   forward fold:  y = [x | x A^T] [W | s B]^T, one product with K = i + R (R: the ranks of the projections that
#                  share the input; a projection's weight holds zeros in its siblings' columns)
#   backward now:  dX = (s dY B) A, then dX += dY W for each projection of the input
#   backward fold: dX = [dY_p... | s dY B] [W_p...; A], one product with K = sum o + R
# Also the copies a fold needs where the input's producer cannot write into the wider buffer.
import torch, triton

torch.manual_seed(0)
N, H, I, KV, r = 4096, 4096, 14336, 1024, 16
dev, dt = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16


def rnd(*shape):
    return torch.randn(*shape, device=dev, dtype=dt)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median") * 1e3  # us


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


rows, now_total, fold_total, fold_copy_total = [], 0.0, 0.0, 0.0


def case(name, now_fn, fold_fn, check=None, copies=0.0):
    global now_total, fold_total, fold_copy_total
    t_now, t_fold = bench(now_fn), bench(fold_fn)
    err = "" if check is None else f" rel.diff {check():.1e}"
    now_total += t_now
    fold_total += t_fold
    fold_copy_total += t_fold + copies
    print(f"{name:34s} now {t_now:7.1f} us   fold {t_fold:7.1f} us   fold+copies {t_fold + copies:7.1f} us"
          f"   saved {t_now - t_fold - copies:6.1f} us{err}", flush=True)


# ---- forward, one input shared by several projections
def forward_group(name, i, outs):
    R = r * len(outs)
    x = rnd(N, i)
    A = rnd(R, i) / i ** 0.5
    Ws = [rnd(o, i) / i ** 0.5 for o in outs]
    Bs = [rnd(o, r) for o in outs]
    u = x @ A.t()
    x_ext = torch.cat([x, u], 1)
    W_ext = []
    for k, (W, B) in enumerate(zip(Ws, Bs)):
        E = torch.zeros(W.shape[0], i + R, device=dev, dtype=dt)
        E[:, :i] = W
        E[:, i + k * r:i + (k + 1) * r] = B
        W_ext.append(E)
    ys = [torch.empty(N, o, device=dev, dtype=dt) for o in outs]

    def now():
        for k, (W, B, y) in enumerate(zip(Ws, Bs, ys)):
            torch.mm(u[:, k * r:(k + 1) * r], B.t(), out=y)
            y.addmm_(x, W.t())

    def fold():
        for E, y in zip(W_ext, ys):
            torch.mm(x_ext, E.t(), out=y)

    def check():
        now()
        a = torch.cat(ys, 1).clone()
        fold()
        return rel(torch.cat(ys, 1), a)

    case(f"fwd {name}", now, fold, check)
    if len(outs) > 1:  # the siblings' weights side by side: one product for the group
        E_all = torch.cat(W_ext)
        y_all = torch.empty(N, sum(outs), device=dev, dtype=dt)
        t = bench(lambda: torch.mm(x_ext, E_all.t(), out=y_all))
        print(f"{'   (side by side: one product)':34s} {t:7.1f} us", flush=True)
    t_copy = bench(lambda: x_ext[:, :i].copy_(x))
    print(f"{'   (copy x into [x | .])':34s} {t_copy:7.1f} us", flush=True)
    return t_copy


# ---- backward dX, one input
def backward_group(name, i, outs, dy_copy: bool):
    R = r * len(outs)
    O = sum(outs)
    A = rnd(R, i) / i ** 0.5
    W = rnd(O, i) / i ** 0.5  # the projections' weights stacked
    stack = torch.cat([W, A])  # [O + R, i]
    dys = [rnd(N, o) for o in outs]
    v = rnd(N, R)
    dy_ext = torch.cat([*dys, v], 1)
    dx = torch.empty(N, i, device=dev, dtype=dt)
    blocks, start = [], 0
    for o in outs:
        blocks.append(W[start:start + o])
        start += o

    def now():
        torch.mm(v, A, out=dx)
        for d, Wp in zip(dys, blocks):
            dx.addmm_(d, Wp)

    def fold():
        torch.mm(dy_ext, stack, out=dx)

    def check():
        now()
        a = dx.clone()
        fold()
        return rel(dx, a)

    copies = 0.0
    if dy_copy:
        copies = bench(lambda: dy_ext[:, :O].copy_(dys[0]))
    case(f"bwd dX {name}" + (" (+dY copy)" if dy_copy else ""), now, fold, check, copies)


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
t_qkv_copy = forward_group("q/k/v", H, [H, KV, KV])
t_o_copy = forward_group("o", H, [H])
t_gu_copy = forward_group("gate/up", H, [I, I])
t_d_copy = forward_group("down", I, [H])
backward_group("q/k/v (dY side by side)", H, [H, KV, KV], dy_copy=False)
backward_group("o", H, [H], dy_copy=True)
backward_group("gate/up (dY side by side)", H, [I, I], dy_copy=False)
backward_group("down", I, [H], dy_copy=True)
print(f"per layer: now {now_total:.1f} us, fold {fold_total:.1f} us, fold with dY copies {fold_copy_total:.1f} us;"
      f" x copies if no producer writes the wider input: q/k/v {t_qkv_copy:.1f}, o {t_o_copy:.1f}, gate/up"
      f" {t_gu_copy:.1f}, down {t_d_copy:.1f} us", flush=True)
print(f"32 layers: now {now_total * 32 / 1e3:.2f} ms, fold {fold_copy_total * 32 / 1e3:.2f} ms, saved "
      f"{(now_total - fold_copy_total) * 32 / 1e3:.2f} ms a step (before x copies)", flush=True)
