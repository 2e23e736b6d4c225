"""Probe: where the offload arm's step time varies. llama-3-8b fused-4bit with offloaded checkpointing; per
step: wall time (CUDA events), the copies' own time on the side stream (D2H in the forward, H2D in the
backward, summed; from events around each copy), their bandwidth, and how long the compute stream stood
waiting for a prefetched input in the backward (events just before and after each wait). Passes an all-ones
attention_mask like the harness. Usage: probe_offload_copies.py [steps]."""
import sys, warnings, torch
warnings.simplefilter("ignore")
import fastbench.checkpointing as C
from fastbench import FastLanguageModel

log = {"d2h": [], "h2d": [], "wait": [], "bytes": 0}
real_save, real_fetch = C.HostOffloader.save, C.HostOffloader._fetch


def timed_on_side(self, fn, kind, nbytes):
    s = self._side_stream_after_compute()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(s)
    out = fn()
    b.record(s)
    log[kind].append((a, b))
    log["bytes"] += nbytes
    return out


def save(self, slot, x):
    return timed_on_side(self, lambda: real_save(self, slot, x), "d2h", x.numel() * x.element_size())


def _fetch(self, key):
    buf, host, device = self._saved[key]
    return timed_on_side(self, lambda: real_fetch(self, key), "h2d", host.numel() * host.element_size())


def load(self, key):
    x, done = self._prefetched.pop(key, None) or self._fetch(key)
    below = (key[0], key[1] - 1)
    if below in self._saved:
        self._prefetched[below] = self._fetch(below)
    if done is not None:
        cur = torch.cuda.current_stream()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(cur); cur.wait_event(done); b.record(cur)
        log["wait"].append((a, b))
    return x


C.HostOffloader.save, C.HostOffloader._fetch, C.HostOffloader.load = save, _fetch, load
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing="offload", fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
    for k in ("d2h", "h2d", "wait"):
        log[k].clear()
    log["bytes"] = 0
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    m(**batch).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    e.record(); torch.cuda.synchronize()
    ms = {k: [a.elapsed_time(b) for a, b in log[k]] for k in ("d2h", "h2d", "wait")}
    copy_ms = sum(ms["d2h"]) + sum(ms["h2d"])
    print(f"step {i}: wall {s.elapsed_time(e):.1f} ms; D2H {sum(ms['d2h']):.1f} ms, H2D {sum(ms['h2d']):.1f} ms "
          f"({log['bytes'] / copy_ms / 1e6:.1f} GB/s); compute stream waited {sum(ms['wait']):.1f} ms "
          f"(longest {max(ms['wait'], default=0):.2f}) over {len(ms['wait'])} loads", flush=True)
