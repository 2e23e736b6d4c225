"""Probe: wall time per step of llama-3-8b arms given as bits:ckpt[:mask] (e.g. bf16:40 4bit:offload:mask;
':mask' passes an all-ones attention_mask as the compare harness and a Trainer do), 3 warm-up steps, then 8
timed with CUDA events; the peak of allocated memory over the warm-up and timed steps (not the build).
Set FASTBENCH_OFFLOAD_SAVE_EVERY to try the offload variant that keeps every n-th layer's MLP activations on the host."""
import sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
for arg in sys.argv[1:]:
    bits, ckpt, *mask = arg.split(":")
    ckpt = ckpt if ckpt == "offload" else float(ckpt)
    batch = dict(input_ids=ids, labels=ids, **({"attention_mask": torch.ones_like(ids)} if mask else {}))
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=bits == "4bit", seed=1)
    m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
    def step():
        loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(3)]
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
    ev[0].record()
    for i in range(8):
        losses.append(step()); ev[i + 1].record()
    torch.cuda.synchronize()
    ms = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(8))
    print(f"{arg}: median {(ms[3] + ms[4]) / 2:.1f} ms/step, min {ms[0]:.1f}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, steps {[round(x, 1) for x in ms]}, losses {[round(l.item(), 4) for l in losses[:3]]}", flush=True)
    del m, base, opt; torch.cuda.empty_cache()
