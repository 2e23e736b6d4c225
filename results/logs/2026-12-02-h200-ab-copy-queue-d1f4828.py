# A/B in one process (llama-3-8b fused-4bit offload, 2x2048): the copy queue's bound held by the host (old: the host
# synchronizes on the oldest copy) vs by the compute stream (new). Rounds alternate; pipelined steps per round.
import os, statistics, sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
from fastbench.bench.profile import offloading
from fastbench.fused.checkpointing.offload import HostOffloader
print("alloc:", {k: v for k, v in os.environ.items() if "ALLOC" in k}, "sha", os.environ.get("FASTBENCH_GIT_SHA"))
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing="offload", fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
off = offloading(m)
new_drain = HostOffloader._drain_copies
waited = {"s": 0.0}
def old_drain(self):
    while self._copying and (self._copying_bytes > self.max_copying_bytes or self._copying[0][0].query()):
        done, x = self._copying.popleft(); t = time.perf_counter(); done.synchronize(); waited["s"] += time.perf_counter() - t
        self._copying_bytes -= x.nbytes
def step():
    loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
for _ in range(4): step()
res = {"host": [], "compute": []}; losses = {"host": [], "compute": []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for name, fn in (("host", old_drain), ("compute", new_drain)) if r % 2 == 0 else (("compute", new_drain), ("host", old_drain)):
        HostOffloader._drain_copies = fn
        step(); torch.cuda.synchronize(); q0, w0 = off.queue_waits, waited["s"]; t = time.perf_counter()
        for _ in range(8): losses[name].append(step())
        torch.cuda.synchronize(); ms = (time.perf_counter() - t) / 8 * 1e3; res[name].append(ms)
        print(f"round {r} {name}: {ms:.1f} ms/step, {4096 / ms * 1e3:,.0f} tok/s; queue_waits/step {(off.queue_waits - q0) / 8:.1f}; host wait ms/step {(waited['s'] - w0) / 8 * 1e3:.1f}", flush=True)
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} ms/step ({4096 / statistics.median(v) * 1e3:,.0f} tok/s) over {len(v)} rounds: {[round(x, 1) for x in v]}")
print("ratio host/compute medians:", round(statistics.median(res["host"]) / statistics.median(res["compute"]), 3))
print("finite losses:", all(torch.isfinite(l).item() for v in losses.values() for l in v))
