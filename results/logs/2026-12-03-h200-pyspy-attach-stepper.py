# llama-3-8b fused-4bit offload steps for py-spy to attach to: warm-up, "ready", then pipelined steps for argv[2]
# seconds (mean ms a step printed every 10 steps), so that a sampler attached after "ready" sees steps only
import sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
bits, ckpt = sys.argv[1].split(":"); ckpt = ckpt if ckpt == "offload" else float(ckpt)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=bits == "4bit", seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
def step():
    m(**batch).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(4): step()
torch.cuda.synchronize(); print("ready", flush=True)
end, n, t = time.monotonic() + float(sys.argv[2]), 0, time.perf_counter()
while time.monotonic() < end:
    step(); n += 1
    if n % 10 == 0:
        torch.cuda.synchronize(); now = time.perf_counter(); print(f"steps {n}: {(now - t) * 100:.1f} ms/step", flush=True); t = now
