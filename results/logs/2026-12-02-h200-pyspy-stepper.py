# steps of llama-3-8b fused-4bit offload for py-spy: warm-up, then timed_steps() for ~N s
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
def timed_steps(n):
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): step()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for _ in range(4): step()
print(f"{sys.argv[1]}: pipelined step ms {timed_steps(24) * 1e3:.1f}", flush=True)
