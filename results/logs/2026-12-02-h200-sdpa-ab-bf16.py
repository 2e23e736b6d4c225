# In-process A/B of SDPA backends on the fused step: cuDNN (torch's pick on Hopper) vs FlashAttention-2 (torch's
# flash backend); rounds alternate, pipelined steps per round. argv: model rounds ckpt bits(16|4)
import os, statistics, sys, time, warnings, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
model, rounds, ckpt, bits = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("alloc:", {k: v for k, v in os.environ.items() if "ALLOC" in k}, "sha", os.environ.get("FASTBENCH_GIT_SHA"),
      torch.cuda.get_device_name(), model, ckpt, bits, flush=True)
base, _ = FastLanguageModel.from_pretrained(model, dtype=torch.bfloat16, device="cuda", load_in_4bit=bits == 4, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)
ids = torch.randint(0, base.config.vocab_size, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
def step():
    loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
arms = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}
for name, b in arms.items():
    with sdpa_kernel(b):
        torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
        print(f"{name} first step {time.perf_counter() - t:.2f} s", flush=True)
        for _ in range(2): step()
res = {k: [] for k in arms}
for r in range(rounds):
    for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
        with sdpa_kernel(arms[name]):
            step(); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(8): step()
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 8 * 1e3; res[name].append(ms)
        print(f"round {r} {name}: {ms:.1f} ms/step", flush=True)
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} ms/step ({4096 / statistics.median(v) * 1e3:,.0f} tok/s): {[round(x, 1) for x in v]}")
print("ratio cudnn/flash medians (above 1: flash faster):", round(statistics.median(res["cudnn"]) / statistics.median(res["flash"]), 4))
