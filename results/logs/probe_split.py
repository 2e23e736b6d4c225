"""Probe (not product code): offloaded 4-bit llama-3-8b step, split parts (current) vs one part per layer
(the old recompute), with Python's GC as is vs frozen after warm-up. Per-step wall, CPU issue, GC pauses."""
import functools, gc, sys, time, warnings
import torch
warnings.simplefilter("ignore")
import fastbench.fused.decoder as dec
import fastbench.fused.causal_lm as clm
from fastbench import FastLanguageModel

split_parts, split_recomputing = clm.layer_parts, dec.recomputing

def single_parts(layer, cos, sin, mask, family):
    fn = lambda x: dec.mlp_residual(layer, dec.attention_residual(layer, x, cos, sin, mask, family), family)
    return [(fn, lambda: [q for q in layer.parameters() if q.requires_grad])]

def use(variant):
    clm.layer_parts = split_parts if variant == "split" else single_parts
    dec.recomputing = split_recomputing if variant == "split" else (lambda: False)

gc_ms = []
def cb(phase, info, t=[0.0]):
    if phase == "start": t[0] = time.perf_counter()
    else: gc_ms.append((info["generation"], (time.perf_counter() - t[0]) * 1e3))
gc.callbacks.append(cb)

base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=sys.argv[1] if len(sys.argv) > 1 else "offload", fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")

def step():
    t0 = time.perf_counter()
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    issue = time.perf_counter() - t0
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, issue * 1e3

for variant, frozen in (("split", False), ("single", False), ("split", True), ("single", True), ("split", False)):
    use(variant)
    gc.unfreeze()
    for _ in range(3): step()
    if frozen: gc.collect(); gc.freeze()
    gc_ms.clear()
    res = [step() for _ in range(8)]
    wall = sorted(r[0] for r in res)
    print(f"{variant:6} gc {'frozen' if frozen else 'normal'}: wall median {wall[4]:.0f} ms [{', '.join(f'{r[0]:.0f}' for r in res)}]; "
          f"CPU issue median {sorted(r[1] for r in res)[4]:.0f} ms; gc: {len(gc_ms)} collections, "
          f"gen2 {sum(g == 2 for g, _ in gc_ms)}, {sum(ms for _, ms in gc_ms):.0f} ms in all", flush=True)
