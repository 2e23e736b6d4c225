# A/B in one process (mistral-7b fused-4bit offload, 2x2048): the backward's prefetch by bytes (prefetch_groups=0,
# the forward's largest group's bytes ahead) vs two groups ahead (prefetch_groups=2). Rounds alternate the order;
# pipelined steps per round; each round's peak allocated memory.
import os, statistics, sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
from fastbench.bench.profile import offloading
print("alloc:", {k: v for k, v in os.environ.items() if "ALLOC" in k}, "sha", os.environ.get("FASTBENCH_GIT_SHA"))
ids = torch.randint(0, 32000, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
base, _ = FastLanguageModel.from_pretrained("mistral-7b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing="offload", fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
off = offloading(m)
def step():
    loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
for _ in range(4): step()
res, peaks, losses = {0: [], 2: []}, {0: [], 2: []}, {0: [], 2: []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    for groups in (0, 2) if r % 2 == 0 else (2, 0):
        off.prefetch_groups = groups
        step(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
        for _ in range(8): losses[groups].append(step())
        torch.cuda.synchronize(); ms = (time.perf_counter() - t) / 8 * 1e3; res[groups].append(ms)
        peaks[groups].append(torch.cuda.max_memory_allocated() / 2**30)
        print(f"round {r} prefetch_groups={groups}: {ms:.1f} ms/step, {4096 / ms * 1e3:,.0f} tok/s, peak allocated {peaks[groups][-1]:.2f} GiB", flush=True)
for k, v in res.items():
    print(f"prefetch_groups={k}: median {statistics.median(v):.1f} ms/step ({4096 / statistics.median(v) * 1e3:,.0f} tok/s) over {len(v)} rounds: {[round(x, 1) for x in v]}; peak allocated {max(peaks[k]):.2f} GiB")
print("ratio 0/2 of medians (above 1: two groups faster):", round(statistics.median(res[0]) / statistics.median(res[2]), 3))
print("finite losses:", all(torch.isfinite(l).item() for v in losses.values() for l in v))
