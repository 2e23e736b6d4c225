"""Probe: is one source tree's training step faster than another's? An A/B of two versions of fastbench (two
checkouts, say main and a branch) on the same GPU, interleaved, each version loaded once.

Each tree is laid out as the installed package (symbolic links) in its own directory under ``--work``, and one
child process per tree imports fastbench from there, builds the arm (llama-3-8b with random weights,
``bits:ckpt`` as the other probes take it, seq x batch of random tokens with an all-ones attention mask as the
harness passes) and runs warm-up steps. Then the children take turns, one at a time, the other idle (A B, B A,
A B, ...): in each turn the child runs ``--steps`` pipelined steps and reports ms per step (synchronised before
and after the block) and, on a GPU with NVML's energy counter, the GPU's joules per step over the block (a GPU
held at its power limit runs a step in the time its energy takes there: the energy says what a change saved).
Both models stay resident, so the GPU memory must hold two. Prints each round, each tree's median, and the ratio
of the medians (A's ms over B's: above 1 means B is faster) with a 95% bootstrap interval over the rounds, and
the same for the joules per step where every round has them; writes all of it, with both trees' git revisions
and the allocator setting, to ``--out`` (JSON), rewritten after every round, so that a run stopped early keeps
the rounds it finished. ``--seconds`` starts no round that would end past that budget (judged by the last round's
length).

    python tools/ab_trees.py /work/main /work/wt-branch --arm 4bit:offload --rounds 6 --steps 8 --seconds 170 \
        --out ab.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def child(args) -> None:
    """Builds the arm, warms up, then runs a block of steps for each line read from stdin."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    from probe_step import build, random_batch, train_step

    gpu_counters = _own_busy_module().gpu_counters  # this checkout's, whatever the tree under test has
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.current_device() if device == "cuda" else None
    model, opt = build(args.arm, args.model, device)
    batch = random_batch(model, args.seq, args.batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        train_step(model, opt, batch)

    for _ in range(args.warmup):
        step()
    sync()
    print(json.dumps({"ready": os.path.dirname(os.path.realpath(sys.modules["fastbench.kernels"].__file__))}),
          flush=True)
    for line in sys.stdin:
        n = int(line)
        sync()
        before = gpu_counters(gpu) if gpu is not None else None
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        ms = (time.perf_counter() - t) / n * 1e3
        after = gpu_counters(gpu) if gpu is not None else None
        energy = [c and c.get("energy_mj") for c in (before, after)]
        joules = None if None in energy else (energy[1] - energy[0]) / 1e3 / n
        print(json.dumps({"ms": ms, "j": joules}), flush=True)


def _own_busy_module():
    """fastbench.bench.busy of the checkout this tool belongs to, loaded from its file (it imports only the standard
    library): the child measures energy the same way whichever tree it imports fastbench from."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(HERE)), "fastbench", "bench", "busy.py")
    spec = importlib.util.spec_from_file_location("_ab_trees_busy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _link(tree: str, target: str) -> None:
    """``target/fastbench`` laid out as the installed package (``kernels/`` and ``autotune/`` inside it, as
    pyproject.toml maps them), of symbolic links into ``tree``: no build, and edits in ``tree`` show."""
    package = os.path.join(target, "fastbench")
    os.makedirs(package, exist_ok=True)
    tree = os.path.abspath(tree)
    entries = {name: os.path.join(tree, "fastbench", name) for name in os.listdir(os.path.join(tree, "fastbench"))}
    entries.update(kernels=os.path.join(tree, "kernels"), autotune=os.path.join(tree, "autotune"))
    for name, source in entries.items():
        link = os.path.join(package, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(source, link)


def _revision(tree: str) -> str:
    """The tree's git revision (+changes where tracked files differ from it); "unknown" for a tree that is not the
    top of a git checkout (a ``git archive`` copy inside another checkout would otherwise take that one's)."""
    top = subprocess.run(["git", "-C", tree, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if os.path.realpath(top.stdout.strip() or "/nonexistent") != os.path.realpath(tree):
        return "unknown"
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def _medians_and_ratio(per_round: dict) -> tuple[dict, float, list[float]]:
    """({tree: median}, A's median over B's, its 95% interval by the harness's bootstrap of a ratio of medians,
    each turn a group of its own: the turns are resampled)."""
    import numpy as np

    from fastbench.bench.stats import bootstrap_ratio

    med = {name: statistics.median(v) for name, v in per_round.items()}
    _, low, high = bootstrap_ratio(*([np.array([t]) for t in per_round[name]] for name in ("A", "B")))
    return med, med["A"] / med["B"], [low, high]


def summarize(args, trees: dict, ms: dict, joules: dict) -> dict:
    """``trees`` (each one's path and git revision, read once) with each one's median ms a step over its turns so
    far and the ratio A/B; the same for the GPU's joules a step where every turn measured them (else None)."""
    med, ratio, interval = _medians_and_ratio(ms)
    energy = all(j is not None for v in joules.values() for j in v) and joules["B"]
    j_med, j_ratio, j_interval = _medians_and_ratio(joules) if energy else (None, None, None)
    return {"arm": args.arm, "model": args.model, "seq": args.seq, "batch": args.batch, "steps": args.steps,
            "rounds": len(ms["B"]), "rounds_asked": args.rounds,
            "trees": trees,
            "alloc_conf": {k: v for k, v in os.environ.items() if "ALLOC_CONF" in k}, "ms_per_step": ms,
            "median_ms": med, "ratio_a_over_b": ratio, "ratio_95": interval,
            "j_per_step": joules, "median_j": j_med, "energy_ratio_a_over_b": j_ratio, "energy_ratio_95": j_interval}


def write(path: str, summary: dict) -> None:
    from fastbench.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", help="two source trees (checkouts of fastbench): A and B")
    ap.add_argument("--arm", default="4bit:offload", help="bits:ckpt, e.g. 4bit:offload, bf16:40, 4bit:auto")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6, help="turns of each tree")
    ap.add_argument("--steps", type=int, default=8, help="pipelined steps per turn")
    ap.add_argument("--seconds", type=float, help="time budget from the start: no round starts that the last "
                    "round's length says would end past it (the rounds done are summarised)")
    ap.add_argument("--work", default="/tmp/ab_trees", help="where each tree is installed")
    ap.add_argument("--out", help="JSON file for every round and the summary, rewritten after each round")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if len(args.trees) != 2:
        ap.error("give two source trees, A and B")
    begin = time.monotonic()
    names, procs = ("A", "B"), {}
    trees = {n: {"path": t, "git": _revision(t)} for n, t in zip(names, args.trees)}
    for name, tree in zip(names, args.trees):
        target = os.path.join(args.work, name)
        _link(tree, target)
        env = {**os.environ, "PYTHONPATH": target + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, HERE, "--child", "--arm", args.arm, "--model", args.model, "--seq", str(args.seq),
               "--batch", str(args.batch), "--warmup", str(args.warmup)]
        procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       cwd=args.work)
    ms, joules = {name: [] for name in names}, {name: [] for name in names}
    try:
        for name, tree in zip(names, args.trees):
            line = procs[name].stdout.readline()
            if not line:
                sys.exit(f"tree {name} ({tree}) failed before its first step")
            print(f"{name}: kernels from {json.loads(line)['ready']}", flush=True)
        last = 0.0
        for r in range(args.rounds):
            started = time.monotonic()
            if args.seconds is not None and r and started - begin + last > args.seconds:
                print(f"stopped after {r} rounds: one more would end past --seconds {args.seconds:g}", flush=True)
                break
            for name in names if r % 2 == 0 else names[::-1]:
                procs[name].stdin.write(f"{args.steps}\n")
                procs[name].stdin.flush()
                turn = json.loads(procs[name].stdout.readline())
                ms[name].append(turn["ms"])
                joules[name].append(turn["j"])
            last = time.monotonic() - started
            print(f"round {r}: A {ms['A'][-1]:.1f} ms/step, B {ms['B'][-1]:.1f} ms/step", flush=True)
            if args.out:
                write(args.out, summarize(args, trees, ms, joules))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=120)
    if not ms["B"]:
        sys.exit("no round finished")
    summary = summarize(args, trees, ms, joules)
    med, (low, high) = summary["median_ms"], summary["ratio_95"]
    tokens = args.seq * args.batch
    for name in names:
        print(f"{name} ({summary['trees'][name]['git']}): median {med[name]:.1f} ms/step, "
              f"{tokens / med[name] * 1e3:,.0f} tokens/s")
    print(f"A/B ratio of medians {med['A'] / med['B']:.3f} (95% interval {low:.3f}-{high:.3f}; above 1: B faster; "
          f"{summary['rounds']} rounds)")
    if summary["median_j"]:
        j, (low, high) = summary["median_j"], summary["energy_ratio_95"]
        print(f"GPU energy: A {j['A']:.1f} J/step, B {j['B']:.1f} J/step; A/B {summary['energy_ratio_a_over_b']:.3f} "
              f"(95% interval {low:.3f}-{high:.3f}; above 1: B needs less energy)")


if __name__ == "__main__":
    main()
