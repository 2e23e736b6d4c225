"""Host time per training step of the fused path on this CPU, Triton ops replaced by their torch references
(so what is timed is the Python + dispatch work around them); 32-layer tiny llama, bf16 weights or NF4."""
import sys, time, warnings, statistics
import torch, torch.nn.functional as F
warnings.simplefilter("ignore")
import fastbench.fused.decoder as dec
import fastbench.fused.causal_lm as clm
import fastbench.kernels.lora as lora
from fastbench.kernels import rms_norm as rn, rope as rp
from fastbench.kernels.lora import GLU
dec.rms_norm = lambda x, w, eps=1e-6, offset=0.0: rn.reference(x, w, eps, offset)
clm.rms_norm = dec.rms_norm
dec.apply_rope = lambda q, k, c, s: rp.reference(q, k, c, s)
def glu_f(g, u): return F.silu(g) * u
def glu_b(dh, g, u, dgate=None, dup=None):
    s = torch.sigmoid(g.float())
    return (dh.float() * u.float() * s * (1 + g.float() * (1 - s))).to(g.dtype), (dh.float() * g.float() * s).to(u.dtype)
dec._GLUS["silu"] = GLU(glu_f, glu_b)
clm.fused_linear_cross_entropy = lambda h, w, labels, num_items_in_batch=None: F.cross_entropy((h @ w.t()).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
import fastbench.kernels.nf4 as nf4
class _NoLaunch:  # the dequantize kernel skipped, its host-side wrapper kept
    def __getitem__(self, grid): return lambda *a, **k: None
nf4._dequantize_nf4_kernel = nf4._dequantize_nf4_group_kernel = _NoLaunch()
from fastbench import FastLanguageModel
from fastbench.presets import PRESETS, Preset
p = PRESETS["llama-3-8b-tiny"]; c = dict(p.config); c["num_hidden_layers"] = 32
PRESETS["probe"] = Preset("probe", p.model_type, c, "probe")
ckpt = {"true": True, "false": False}.get(sys.argv[1], sys.argv[1])
bits = len(sys.argv) > 2
base, _ = FastLanguageModel.from_pretrained("probe", dtype=torch.float32, load_in_4bit=bits, device="cpu", seed=0)
m = FastLanguageModel.get_peft_model(base, r=16, lora_alpha=16, random_state=0, use_gradient_checkpointing=ckpt, fallback=False)
ids = torch.randint(0, 512, (1, 8))
def step(): m(input_ids=ids, labels=ids).loss.backward()
for _ in range(3): step()
ts = []
for _ in range(30):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(sys.argv[1:], f"host {statistics.median(ts) * 1e3:.1f} ms/step (median of 30)")
