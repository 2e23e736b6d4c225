"""The RoPE kernel before (main's tree, argv[1]/kernels/rope.py) and after the tile-of-tokens change (this tree), in
one process on the GPU, each with the config the bundled file served the old kernel (argv[2]), at the families'
head sizes, out of place in the training layout; CUDA-event medians (triton.testing.do_bench), 3 alternating
rounds. Prints one JSON line per problem and pass."""
import importlib.util
import json
import sys

import torch
from triton.testing import do_bench

from fastbench.kernels import rope as new
from fastbench.presets import build_config

spec = importlib.util.spec_from_file_location("rope_before", f"{sys.argv[1]}/kernels/rope.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
served = {}
for k, e in json.load(open(sys.argv[2]))["entries"].items():
    if e["op"] == "rope":
        served[(e["pass"], tuple(sorted(e["problem"].items())))] = e["config"]

for preset in ("llama-3-8b", "llama-3.2-1b", "gemma-7b", "qwen2.5-7b"):
    c = build_config(preset)
    n_q, n_k = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // n_q
    for T in (2048, 4096, 8192):
        proj = torch.randn(1, T, (n_q + n_k) * D, device="cuda", dtype=torch.bfloat16)
        heads = proj.view(1, T, n_q + n_k, D)
        q, k = heads[:, :, :n_q].transpose(1, 2), heads[:, :, n_q:].transpose(1, 2)
        out = torch.empty_like(proj).view(1, T, n_q + n_k, D)
        q_out, k_out = out[:, :, :n_q].transpose(1, 2), out[:, :, n_q:].transpose(1, 2)
        angle = torch.rand(T, D // 2, device="cuda") * 100
        cos, sin = (f(torch.cat((angle, angle), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        problem = {"dtype": "bfloat16", "head_dim": D, "k_heads": n_k, "q_heads": n_q, "tokens": T}
        for pass_name in ("fwd", "bwd"):
            config = served.get((pass_name, tuple(sorted(problem.items())))) or new.heuristic(pass_name, problem)
            bwd = pass_name == "bwd"
            times = {"before": [], "after": []}
            for _ in range(3):
                for name, mod in (("before", old), ("after", new)):
                    times[name].append(1e3 * do_bench(lambda: mod._launch(q, k, cos, sin, bwd, config, q_out, k_out),
                                                      warmup=25, rep=100, return_mode="median"))
            ref = old.reference(q, k, cos, -sin if bwd else sin)
            mod_out = (q_out.clone(), k_out.clone())
            same = all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(mod_out, ref))
            print(json.dumps({"preset": preset, "tokens": T, "pass": pass_name, "config": config,
                              "before_us": sorted(times["before"])[1], "after_us": sorted(times["after"])[1],
                              "matches_reference": same}), flush=True)
