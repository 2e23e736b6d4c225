# The recomputed units from CUDA graphs on and off, one process each (argv: 0 or 1, [model], [ckpt]): llama-3-8b
# 4-bit offload at seq 2048 x batch 2, 3 warm-up steps, then 8 pipelined steps timed; peak allocated / reserved
# (torch) and the process's NVML memory over the timed steps, the graphs' counters; the allocator setting
import os, sys, time, json, warnings
warnings.simplefilter("ignore")
import torch
sys.path.insert(0, "tools")
from probe_step import random_batch, train_step
from fastbench import FastLanguageModel
from fastbench.fused.checkpointing import CheckpointConfig
from fastbench.fused.state import fused_state

graphs_on = sys.argv[1] == "1"
model_name = sys.argv[2] if len(sys.argv) > 2 else "llama-3-8b"
ckpt = sys.argv[3] if len(sys.argv) > 3 else "offload"
base, _ = FastLanguageModel.from_pretrained(model_name, dtype=torch.bfloat16, device="cuda", load_in_4bit=True, seed=1)
c = CheckpointConfig.of(ckpt)
config = CheckpointConfig(c.mode, c.budget, c.offload, cuda_graphs=graphs_on)
model = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=config, fallback=False)
torch.cuda.empty_cache()  # what loading and quantizing left cached, as the harness does
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
batch = random_batch(model, 2048, 2)
losses = []
for _ in range(3):
    losses.append(round(train_step(model, opt, batch).item(), 5))
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
import pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
nvml = 0
t = time.perf_counter()
for _ in range(8):
    loss = train_step(model, opt, batch)
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == os.getpid():
            nvml = max(nvml, p.usedGpuMemory or 0)
torch.cuda.synchronize()
ms = (time.perf_counter() - t) / 8 * 1e3
g = fused_state(model).checkpointing.graphs
print(json.dumps(dict(model=model_name, ckpt=ckpt, cuda_graphs=graphs_on, ms_per_step=round(ms, 1),
                      warmup_losses=losses, last_loss=round(float(loss), 5), peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                      nvml_gib=round(nvml / 2**30, 3), captures=None if g is None else g.captures,
                      replays=None if g is None else g.replays,
                      alloc_conf=os.environ.get("PYTORCH_ALLOC_CONF"))), flush=True)
