"""Probe: the 4-bit offloaded llama-3-8b step with launches straight to the compiled kernels vs through
Triton (FASTBENCH_FAST_LAUNCH toggled in one process, interleaved), then a cProfile of one direct step."""
import cProfile, io, os, pstats, sys, time, warnings
import torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
ckpt = sys.argv[1] if len(sys.argv) > 1 else "offload"
ckpt = ckpt if ckpt == "offload" else float(ckpt)
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
def step():
    t0 = time.perf_counter(); m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
for _ in range(3): step()
res = {"1": [], "0": []}
for rnd in range(3):
    for mode in ("1", "0"):
        os.environ["FASTBENCH_FAST_LAUNCH"] = mode
        step(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); issue = [step() for _ in range(4)]; e.record(); torch.cuda.synchronize()
        res[mode].append((s.elapsed_time(e) / 4, sum(issue) / 4 * 1e3))
for mode, name in (("1", "direct"), ("0", "triton")):
    print(f"{ckpt} launches {name}: wall ms/step per round {[round(w, 1) for w, _ in res[mode]]}, CPU issue {[round(i, 1) for _, i in res[mode]]}", flush=True)
os.environ["FASTBENCH_FAST_LAUNCH"] = "1"
torch.cuda.synchronize(); pr = cProfile.Profile(); pr.enable(); step(); torch.cuda.synchronize(); pr.disable()
out = io.StringIO(); pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25); print(out.getvalue()[-7000:], flush=True)
