"""Aten ops dispatched per decoder layer in one training step of the fused path (tiny llama, CPU)."""
import collections, sys, warnings
import torch
from torch.utils._python_dispatch import TorchDispatchMode
warnings.simplefilter("ignore")
from fastbench import FastLanguageModel

import triton.runtime.interpreter as I
_inside = [0]
_orig = I.GridExecutor.__call__
def _grid_call(self, *a, **k):
    mode = Count.current
    if mode is not None: mode.c["TRITON:" + self.fn.__name__] += 1
    _inside[0] += 1
    try: return _orig(self, *a, **k)
    finally: _inside[0] -= 1
I.GridExecutor.__call__ = _grid_call

class Count(TorchDispatchMode):
    current = None
    def __init__(self): super().__init__(); self.c = collections.Counter()
    def __enter__(self): Count.current = self; return super().__enter__()
    def __exit__(self, *a): Count.current = None; return super().__exit__(*a)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _inside[0]: self.c[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

ckpt = {"true": True, "false": False}.get(sys.argv[1], sys.argv[1])
bits = len(sys.argv) > 2 and sys.argv[2] == "4bit"
res = {}
for layers in (2, 4):
    from fastbench.presets import PRESETS, Preset
    p = PRESETS["llama-3-8b-tiny"]; c = dict(p.config); c["num_hidden_layers"] = layers
    PRESETS[f"probe{layers}"] = Preset(f"probe{layers}", p.model_type, c, "probe")
    base, _ = FastLanguageModel.from_pretrained(f"probe{layers}", dtype=torch.bfloat16 if bits else torch.float32, load_in_4bit=bits, device="cpu", seed=0)
    m = FastLanguageModel.get_peft_model(base, r=4, random_state=0, use_gradient_checkpointing=ckpt, fallback=False)
    ids = torch.randint(0, 512, (1, 8))
    m(input_ids=ids, labels=ids).loss.backward()
    with Count() as cnt:
        m(input_ids=ids, labels=ids).loss.backward()
    res[layers] = cnt.c
per = {k: (res[4][k] - res[2][k]) / 2 for k in res[4]}
print(f"{sys.argv[1:]}: {sum(v for k, v in per.items() if not k.startswith('TRITON')):.0f} aten ops and {sum(v for k, v in per.items() if k.startswith('TRITON')):.0f} Triton launches per layer")
for k, v in sorted(per.items(), key=lambda x: -x[1])[:40]: print(f"  {v:5.1f} {k}")
