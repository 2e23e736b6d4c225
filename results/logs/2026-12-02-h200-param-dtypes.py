"""One arm as the harness builds it (imports first, build, fused AdamW), three steps of random tokens at
seq 2048 x batch 2: the trainable parameters' dtypes and bytes, the gradients' and the optimizer state's,
and allocated/reserved memory after the build and after each step. Usage: param_dtypes.py ARM MODEL"""
import json, sys, collections
label, model_name = sys.argv[1], sys.argv[2]
from fastbench.bench import arms
arm = arms.get_arm(label)
for m in arm.import_first:
    __import__(m)
import torch
G = 2**30
cfg = arms.RunConfig(model=model_name, seq_len=2048, batch=2, device="cuda")
cfg.arm_options = arms.parse_label(label)[1]
mem = lambda: (round(torch.cuda.memory_allocated() / G, 3), round(torch.cuda.memory_reserved() / G, 3))
model = arm.build(cfg)
out = {"arm": label, "model": model_name, "after_build": mem()}
params = [p for p in model.parameters() if p.requires_grad]
out["trainable"] = {str(k): v for k, v in collections.Counter(p.dtype for p in params).items()}
out["trainable_gib"] = round(sum(p.numel() * p.element_size() for p in params) / G, 3)
frozen = [p for p in model.parameters() if not p.requires_grad]
out["frozen_gib"] = round(sum(p.numel() * p.element_size() for p in frozen) / G, 3)
out["frozen_dtypes"] = {str(k): v for k, v in collections.Counter(p.dtype for p in frozen).items()}
out["buffers_gib"] = round(sum(b.numel() * b.element_size() for b in model.buffers() if b.is_cuda) / G, 3)
opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
V = cfg.validate().vocab_size
steps = []
for i in range(3):
    ids = torch.randint(0, V, (2, 2048), device="cuda")
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    if i == 0:
        out["grads"] = {str(k): v for k, v in collections.Counter(p.grad.dtype for p in params if p.grad is not None).items()}
    opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    steps.append(mem())
out["after_steps"] = steps
out["opt_state_gib"] = round(sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)) / G, 3)
out["peak"] = (round(torch.cuda.max_memory_allocated() / G, 3), round(torch.cuda.max_memory_reserved() / G, 3))
segs = collections.Counter()
for s in torch.cuda.memory_snapshot():
    segs[(s["segment_type"], s["total_size"] // 2**20)] += 1
out["segments_mib"] = sorted(((t, mb, n) for (t, mb), n in segs.items()), key=lambda x: -x[1] * x[2])[:12]
print(json.dumps(out))
