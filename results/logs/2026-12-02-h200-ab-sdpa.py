# In-process A/B of SDPA backends on the fused step (llama-3-8b fused-4bit offload 2x2048): cuDNN (torch's pick on
# the H200) vs FlashAttention-2 (torch's flash backend); rounds alternate, pipelined steps per round.
import os, statistics, sys, time, warnings, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
print("alloc:", {k: v for k, v in os.environ.items() if "ALLOC" in k}, "sha", os.environ.get("FASTBENCH_GIT_SHA"))
arm = sys.argv[2] if len(sys.argv) > 2 else "offload"
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=arm, fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
def step():
    loss = m(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss
arms = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}
for b in arms.values():
    with sdpa_kernel(b):
        for _ in range(3): step()
res = {k: [] for k in arms}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
        with sdpa_kernel(arms[name]):
            step(); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(8): step()
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 8 * 1e3; res[name].append(ms)
        print(f"round {r} {name}: {ms:.1f} ms/step", flush=True)
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} ms/step ({4096 / statistics.median(v) * 1e3:,.0f} tok/s): {[round(x, 1) for x in v]}")
print("ratio cudnn/flash medians:", round(statistics.median(res["cudnn"]) / statistics.median(res["flash"]), 3))
