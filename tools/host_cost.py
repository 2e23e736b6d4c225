"""Probe (CPU): the host's cost to issue one decoder layer of the fused path's training step (forward and
backward, no optimizer), the Python and aten dispatch that a GPU step waits for where the host is the bound.
Arms as bits:ckpt (``4bit:offload``, ``bf16:offload``, ``bf16:true``), on a tiny preset (``--model``, default
llama-3-8b-tiny) with 2 and 4 layers (the per-layer cost is half the difference), bf16, r=4, batch 2 x 16
tokens, one intra-op thread.

Every Triton launch is replaced by a no-op (the interpreter would dominate otherwise): what is timed is our
launchers' host work (config lookup, grid, checks, allocations) and everything around them, not Triton's own
launch path. A CPU's aten ops cost what they cost on a CPU, not CUDA's dispatch and launch, and the offloader's
stream and event calls do not run on a CPU: proxies, the GPU decides. Prints per arm: host CPU µs per layer
(process time, which other processes on a shared machine disturb less than wall time; median of the steps, the
2- and 4-layer models interleaved), aten ops and Triton launches per layer (with ``--sites``, by the line that
called them), and a cProfile top 20 by self time per layer of fastbench's own functions (calls per layer too).

    python tools/host_cost.py 4bit:offload bf16:offload [--model qwen3-8b-tiny] [--steps 300] [--sites]
"""
import argparse
import collections
import cProfile
import os
import pstats
import statistics
import time
import traceback
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

warnings.simplefilter("ignore")
torch.set_num_threads(1)
launches = collections.Counter()


def _no_launch(self, *args, grid, warmup, **kwargs):
    launches[self.fn.__name__] += 1


interpreter.InterpretedFunction.run = _no_launch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(path: str) -> bool:
    """Whether ``path`` is fastbench's source: under the checkout, not a tool, nor a package installed in a
    virtual environment kept inside the checkout."""
    return path.startswith(ROOT) and "/tools/" not in path and "site-packages" not in path


class _Ops(TorchDispatchMode):
    """Counts aten ops by name, and with ``sites`` by name and the fastbench source line that called them."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.ops, self.sites, self._sites = collections.Counter(), collections.Counter(), sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if self._sites:
            frame = next((f for f in traceback.extract_stack()[::-1]
                          if _ours(f.filename)), None)
            where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}" if frame else "(torch)"
            self.sites[f"{name} @ {where}"] += 1
        return func(*args, **(kwargs or {}))


def build(arm: str, layers: int, model: str = "llama-3-8b-tiny"):
    from probe_step import parse_arm, preset_with_layers

    from fastbench import FastLanguageModel

    load_in_4bit, ckpt = parse_arm(arm)
    with preset_with_layers(model, layers) as name:
        base, _ = FastLanguageModel.from_pretrained(name, dtype=torch.bfloat16, load_in_4bit=load_in_4bit,
                                                    device="cpu", seed=0)
    m = FastLanguageModel.get_peft_model(base, r=4, random_state=0, use_gradient_checkpointing=ckpt, fallback=False)
    ids = torch.randint(0, min(512, base.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))

    def step():
        m(**batch).loss.backward()
        m.zero_grad(set_to_none=True)

    return step


def per_layer(by_layers: dict, scale: float = 1.0) -> dict:
    """{name: (value at 4 layers - value at 2 layers) / 2 * scale}."""
    names = set(by_layers[2]) | set(by_layers[4])
    return {k: (by_layers[4].get(k, 0) - by_layers[2].get(k, 0)) / 2 * scale for k in names}


def own_functions(prof: cProfile.Profile) -> dict:
    """{'file:line(function)': (self seconds, calls)} of fastbench's functions."""
    out = {}
    for (path, line, fn), (_, calls, tottime, _, _) in pstats.Stats(prof).stats.items():
        if _ours(path):
            out[f"{os.path.relpath(path, ROOT)}:{line}({fn})"] = (tottime, calls)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--model", default="llama-3-8b-tiny", help="a tiny preset (any family's *-tiny)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--profile-steps", type=int, default=50)
    ap.add_argument("--sites", action="store_true", help="also the aten ops per layer by the line that called them")
    args = ap.parse_args()
    for arm in args.arms:
        steps = {n: build(arm, n, args.model) for n in (2, 4)}
        for step in steps.values():
            for _ in range(5):
                step()
        times = {2: [], 4: []}
        for _ in range(args.steps):
            for n, step in steps.items():
                t = time.process_time()
                step()
                times[n].append(time.process_time() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        ops, sites, counted, prof = {}, {}, {}, {}
        for n, step in steps.items():
            launches.clear()
            with _Ops(args.sites) as mode:
                step()
            ops[n], sites[n], counted[n] = mode.ops, mode.sites, dict(launches)
            p = cProfile.Profile()
            p.enable()
            for _ in range(args.profile_steps):
                step()
            p.disable()
            prof[n] = {k: v[0] for k, v in own_functions(p).items()}, {k: v[1] for k, v in own_functions(p).items()}
        op_layer = per_layer(ops)
        launch_layer = per_layer(counted)
        us = {k: v for k, v in per_layer({n: prof[n][0] for n in prof}, 1e6 / args.profile_steps).items()}
        calls = per_layer({n: prof[n][1] for n in prof}, 1 / args.profile_steps)
        print(f"{args.model} {arm}: {(med[4] - med[2]) / 2 * 1e6:.0f} us host per layer (median step: 2 layers "
              f"{med[2] * 1e3:.2f} ms, 4 layers {med[4] * 1e3:.2f} ms); {sum(op_layer.values()):.0f} aten ops and "
              f"{sum(launch_layer.values()):.0f} Triton launches per layer")
        print("  aten ops per layer: " + ", ".join(f"{k} {v:g}" for k, v in
                                                    sorted(op_layer.items(), key=lambda x: -x[1]) if v))
        print("  launches per layer: " + ", ".join(f"{k} {v:g}" for k, v in
                                                    sorted(launch_layer.items(), key=lambda x: -x[1]) if v))
        if args.sites:
            print("  aten ops per layer by caller:")
            for k, v in sorted(per_layer(sites).items(), key=lambda x: -x[1]):
                if v:
                    print(f"    {v:5.1f}  {k}")
        print(f"  fastbench functions by self time per layer (cProfile, {args.profile_steps} steps; "
              "profiling inflates each call):")
        for k, v in sorted(us.items(), key=lambda x: -x[1])[:20]:
            print(f"    {v:7.1f} us {calls[k]:5.1f} calls  {k}")


if __name__ == "__main__":
    main()
