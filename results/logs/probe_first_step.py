# First steps of llama-3-8b fused-4bit offload: wall per step, and the time spent getting host buffers.
import sys, time, warnings, torch
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel
import fastbench.checkpointing as C
spent = [0.0]
orig = C.HostOffloader._host_buffer
def timed(self, like):
    t0 = time.perf_counter(); r = orig(self, like); spent[0] += time.perf_counter() - t0; return r
C.HostOffloader._host_buffer = timed
mode = sys.argv[1] if len(sys.argv) > 1 else "offload"
mode = float(mode) if mode[0].isdigit() else mode
base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
m = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=mode, fallback=False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
ids = torch.randint(0, 128256, (2, 2048), device="cuda")
torch.cuda.synchronize()
for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 4):
    spent[0] = 0.0
    t0 = time.perf_counter(); m(input_ids=ids, labels=ids).loss.backward(); t1 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"{mode} step {i}: fwd+bwd issue {1e3*(t1-t0):.0f} ms, wall {1e3*(t2-t0):.0f} ms, host buffers {1e3*spent[0]:.0f} ms", flush=True)
