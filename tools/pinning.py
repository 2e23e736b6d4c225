"""Probe: how long pinning host memory takes on this machine (pin_memory, cudaHostRegister), and what
device-to-host copies into pinned and pageable buffers cost."""
import time, torch
torch.zeros(1, device="cuda")
n = 16 << 20  # bf16 elements in 32 MiB
def t(label, f):
    t0 = time.perf_counter(); r = f(); print(f"{label}: {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True); return r
a = t("64 x 32 MiB torch.empty(pin_memory=True)", lambda: [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(64)])
b = t("1 x 2 GiB torch.empty(pin_memory=True)", lambda: torch.empty(64 * n, dtype=torch.bfloat16, pin_memory=True))
c = t("1 x 2 GiB pageable torch.empty", lambda: torch.empty(64 * n, dtype=torch.bfloat16))
t(f"touch it with zero_ ({torch.get_num_threads()} threads)", lambda: c.zero_())
cr = torch.cuda.cudart()
t("cudaHostRegister of it (touched)", lambda: cr.cudaHostRegister(c.data_ptr(), c.numel() * 2, 0))
d = torch.empty(64 * n, dtype=torch.bfloat16)
t("cudaHostRegister 2 GiB untouched", lambda: cr.cudaHostRegister(d.data_ptr(), d.numel() * 2, 0))
g = torch.randn(n, device="cuda").bfloat16()
for name, host in (("pinned", a[0]), ("registered", c[:n]), ("pageable", torch.empty(n, dtype=torch.bfloat16).zero_())):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10):
        host.copy_(g, non_blocking=True)
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"{name}: is_pinned {host.is_pinned()}, D2H issue {(t1 - t0) * 1e2:.2f} ms/copy, wall {(t2 - t0) * 1e2:.2f} ms/copy", flush=True)
