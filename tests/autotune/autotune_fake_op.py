"""A fake op for the autotune tests: a pure-torch "kernel" whose candidates behave by their BLOCK
(fine, raise, wrong answer, NaN, hang, crash) and a fake timer that reads per-BLOCK samples.

Importable by name so that a spawned tuner worker can load it too (its globals start from these
defaults there)."""
import os
import time

import torch

from fastbench.autotune.spec import OpSpec, TuneCase

BEHAVIOUR = {8: "ok", 16: "ok", 32: "ok", 64: "raise", 128: "wrong", 256: "nan", 512: "hang", 1024: "crash"}
# per-BLOCK timer samples (ms); tests overwrite entries in-process
TIMES = {8: [0.5] * 9, 16: [1.0] * 9, 32: [1.0] * 9, 64: [0.1] * 9, 128: [0.1] * 9, 256: [0.1] * 9,
         512: [0.1] * 9, 1024: [0.1] * 9}
LAST = {}


def fake_kernel(x, config):
    """y = 2 x, unless the config's BLOCK says otherwise."""
    LAST.update(config)
    mode = BEHAVIOUR[config["BLOCK"]]
    if mode == "raise":
        raise RuntimeError("out of resources: shared memory")
    if mode == "hang":
        time.sleep(3600)
    if mode == "crash":
        os._exit(7)
    y = 2 * x
    if mode == "wrong":
        y = y + 1
    if mode == "nan":
        y = y.clone()
        y[0, 0] = float("nan")
    return y


def fake_timer(run, quick=False):
    run()
    return TIMES[LAST["BLOCK"]][:3] if quick else TIMES[LAST["BLOCK"]]


def heuristic(pass_name, problem):
    return {"BLOCK": 32, "num_warps": 2}


def problems(model_config, tokens, dtype):
    p = {"dtype": str(dtype).removeprefix("torch."), "hidden": model_config.hidden_size, "tokens": tokens}
    return [("fwd", p), ("bwd", p)]


def tune_case(pass_name, problem, device):
    x = torch.randn(3, 5, device=device) + 0.5
    return TuneCase(lambda config: fake_kernel(x, config), 2 * x, 1e-5)


def _candidates(blocks):
    return [{"BLOCK": b, "num_warps": 2 if b == 32 else 4} for b in blocks]


SPEC = OpSpec("fake", {"fwd": _candidates([16, 32, 64, 128, 256]), "bwd": _candidates([16, 32])},
              heuristic, tune_case=tune_case, problems=problems, kernels=(fake_kernel,))
# candidates that hang or kill the process: only for the tests that run a worker process
UNRULY = OpSpec("fake_unruly", {"fwd": _candidates([32, 512, 1024, 16])}, heuristic,
                tune_case=tune_case, problems=problems, kernels=(fake_kernel,))
# a fast one (8), the default (32), a wrong answer, a hang, a compile failure: the two-phase tests
MIXED = OpSpec("fake_mixed", {"fwd": _candidates([16, 8, 128, 512, 32, 64]), "bwd": _candidates([32, 8])}, heuristic,
               tune_case=tune_case, problems=problems, kernels=(fake_kernel,))
SPECS = [UNRULY, MIXED]


# what the lookup tests share: an H200 under Triton 3.6, a problem in the 4096-token bucket, configs written to a
# cache file and a Lookup reading the two cache folders
DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
TOOLS = {"triton": "3.6.0", "cuda": "13.0"}
PROBLEM = {"dtype": "float32", "hidden": 64, "tokens": 3000}  # bucket 4096


def put(path, config, tokens=4096, spec=SPEC, pass_name="fwd", device=DEVICE, tools=TOOLS, hidden=64):
    """Writes ``config`` for ``spec``'s pass at PROBLEM of ``tokens`` tokens (and ``hidden``) into the cache file
    ``path``, as the tuner records it."""
    from fastbench.autotune import key, store

    problem = key.canonical_problem({**PROBLEM, "hidden": hidden, "tokens": tokens})
    k = key.entry_key(spec.name, pass_name, key.kernel_hash(spec), problem)
    store.update(path, device, tools, {k: {"op": spec.name, "pass": pass_name, "kernel": key.kernel_hash(spec),
                                           "problem": problem, "config": dict(config)}})


def make_lookup(dirs, device=DEVICE, tools=TOOLS):
    """A Lookup over the (user cache, bundled) folders ``dirs``, its configs checked on the CPU."""
    from fastbench.autotune import lookup

    root, bundled = dirs
    return lookup.Lookup(device=device, tools=tools, root=root, bundled=bundled, check_device="cpu")
