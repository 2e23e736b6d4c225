# Which captures of the recomputed units fail, and why: tiny llama, 4 AdamW steps with graphs on, under one
# capture_error_mode (argv[1]: global, thread_local or relaxed), NF4 base where argv[2] == "4bit", offload mode;
# prints the counters, the losses against eager units, and the last failure's traceback
import sys, warnings
import torch
from fastbench import FastLanguageModel
from fastbench.fused.checkpointing import CheckpointConfig
from fastbench.fused.state import fused_state

mode, four = sys.argv[1], sys.argv[2] == "4bit"


def run(graphs_on):
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.bfloat16, device="cuda",
                                                load_in_4bit=four, seed=1)
    model = FastLanguageModel.get_peft_model(base, r=8, random_state=2, fallback=False,
                                             use_gradient_checkpointing=CheckpointConfig("offload", cuda_graphs=graphs_on))
    g = fused_state(model).checkpointing.graphs
    if g is not None:
        g.capture_error_mode = mode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 512, (2, 64), device="cuda", generator=gen)
        loss = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
    return losses, g


eager = run(False)[0] if len(sys.argv) < 4 else None
with warnings.catch_warnings(record=True):
    losses, g = run(True)
print(f"{mode} {sys.argv[2]}: captures {g.captures} replays {g.replays} losses {losses} eager {eager}", flush=True)
if g.first_error:
    print("first failure:", g.first_error[-6000:], flush=True)
