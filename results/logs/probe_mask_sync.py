"""Probe: does passing an all-ones attention_mask (as the compare harness and a Trainer do) slow a step?
One llama-3-8b model (argument bits:ckpt, e.g. 4bit:offload), 3 warm-up steps, then rounds alternating
with and without the mask, 6 steps each, timed with CUDA events."""
import sys, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
bits, ckpt = sys.argv[1].split(":")
ckpt = ckpt if ckpt == "offload" else float(ckpt)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=bits == "4bit", seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
batches = {"mask": dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)), "none": dict(input_ids=ids, labels=ids)}
def step(batch):
    m(**batch).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3):
    step(batches["none"])
times = {"mask": [], "none": []}
for rnd in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for name in ("mask", "none") if rnd % 2 == 0 else ("none", "mask"):
        step(batches[name])  # the switch's own step, untimed
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(7)]
        ev[0].record()
        for i in range(6):
            step(batches[name]); ev[i + 1].record()
        torch.cuda.synchronize()
        times[name] += [ev[i].elapsed_time(ev[i + 1]) for i in range(6)]
for name, ts in times.items():
    ts = sorted(ts)
    print(f"{sys.argv[1]} attention_mask {name}: median {ts[len(ts) // 2]:.1f} ms/step, min {ts[0]:.1f}, max {ts[-1]:.1f} ({len(ts)} steps)", flush=True)
