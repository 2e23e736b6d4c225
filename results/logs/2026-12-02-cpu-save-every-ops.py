"""CPU probe: aten ops and Triton launches of one training step (forward + backward) of a tiny preset with 8
layers, fused-4bit offload, at save_every 2 and 4 (0 too): how the host's work per step grows with recomputation."""
import collections, os, sys, warnings
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode
warnings.simplefilter("ignore"); torch.set_num_threads(1)
launches = collections.Counter()
def _no_launch(self, *a, grid, warmup, **k): launches[self.fn.__name__] += 1
interpreter.InterpretedFunction.run = _no_launch
class Ops(TorchDispatchMode):
    def __init__(self): super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1; return func(*args, **(kwargs or {}))
from fastbench import FastLanguageModel
from fastbench.presets import PRESETS, Preset
model = sys.argv[1] if len(sys.argv) > 1 else "qwen3-8b-tiny"
p = PRESETS[model]; L = 8
PRESETS["probe"] = Preset("probe", p.model_type, {**p.config, "num_hidden_layers": L}, "probe")
for every in (0, 4, 2):
    base, _ = FastLanguageModel.from_pretrained("probe", dtype=torch.bfloat16, load_in_4bit=True, device="cpu", seed=0)
    m = FastLanguageModel.get_peft_model(base, r=4, random_state=0, use_gradient_checkpointing="offload",
                                         offload={"save_every": every}, fallback=False)
    ids = torch.randint(0, 512, (2, 16))
    def step():
        m(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss.backward(); m.zero_grad(set_to_none=True)
    step(); step()
    launches.clear(); ops = Ops()
    with ops: step()
    print(f"{model} {L} layers save_every={every}: {ops.n} aten ops, {sum(launches.values())} launches per step", flush=True)
