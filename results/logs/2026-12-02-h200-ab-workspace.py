# A/B in one process (fused-4bit offload, 2x2048): NF4 gate/up dequantized side by side into a workspace that
# grows to hold both ("together", before) vs one weight at a time into a workspace of the largest single weight
# ("apart", the new default), and apart with the MLP's backward in chunks of 2048 tokens ("apart+chunk2048").
# Rounds rotate the order; before each round the workspace and the cast factors are dropped, the allocator's free
# memory released (empty_cache) and its peaks reset, so each round's peak allocated and reserved are its own.
import os, statistics, sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
import fastbench.kernels.lora as lora
preset, rounds = sys.argv[1], int(sys.argv[2])
print("alloc:", {k: v for k, v in os.environ.items() if "ALLOC" in k}, "sha", os.environ.get("FASTBENCH_GIT_SHA"), preset)
base, _ = FastLanguageModel.from_pretrained(preset, dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
ids = torch.randint(0, base.config.vocab_size, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing="offload", fallback=False)
cache = m.get_base_model().get_decoder()._fastbench.lora_cache
single = cache.workspace_bytes
print(f"workspace of the largest single weight: {single / 2**20:.0f} MiB")
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
defaults = lora.lora_mlp.__defaults__
VARIANTS = {"together": (None, 4096), "apart": (single, 4096), "apart+chunk2048": (single, 2048)}
def use(name):
    ws, rows = VARIANTS[name]
    torch.cuda.synchronize()
    cache.workspace_bytes = ws
    cache._workspaces.clear(); cache._casts.clear()
    lora.lora_mlp.__defaults__ = defaults[:-1] + (rows,)
def step():
    loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
use("together")
for _ in range(4): step()
names = list(VARIANTS)
res, alloc, resv, losses = ({n: [] for n in names} for _ in range(4))
for r in range(rounds):
    for name in names[r % 3:] + names[:r % 3]:
        use(name)
        step(); torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        step(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(8): losses[name].append(step())
        torch.cuda.synchronize(); ms = (time.perf_counter() - t) / 8 * 1e3; res[name].append(ms)
        alloc[name].append(torch.cuda.max_memory_allocated() / 2**30); resv[name].append(torch.cuda.max_memory_reserved() / 2**30)
        print(f"round {r} {name}: {ms:.1f} ms/step, {4096 / ms * 1e3:,.0f} tok/s, peak allocated {alloc[name][-1]:.3f} GiB, reserved {resv[name][-1]:.3f} GiB", flush=True)
for n in names:
    v = res[n]
    print(f"{n}: median {statistics.median(v):.1f} ms/step ({4096 / statistics.median(v) * 1e3:,.0f} tok/s) over {len(v)} rounds {[round(x, 1) for x in v]}; peak allocated {max(alloc[n]):.3f}, reserved {max(resv[n]):.3f} GiB")
print("finite losses:", all(torch.isfinite(l).item() for v in losses.values() for l in v))
