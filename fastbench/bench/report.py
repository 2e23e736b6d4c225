"""``reports/<id>.md``: the environment, the table per model and arm, the loss check, the noise floor,
regressions, where the time of a step goes (runs with ``--profile``), and two PNG plots (tokens/s with
its p10-p90 spread, peak memory with its min-max over repeats), drawn with matplotlib's Agg backend."""
from __future__ import annotations

import os
import statistics

from fastbench.bench.regress import describe as describe_regression
from fastbench.files import atomic_path
from fastbench.env import format_host, format_switches

CPU_NOTE = "CPU run: these figures prove the pipeline works end to end, not how fast anything is."


def _fmt(value, spec=",.0f", missing="n/a") -> str:
    return missing if value is None else format(value, spec)


def loss_lines(summary: dict) -> list[str]:
    lines = []
    for c in summary["loss_checks"]:
        text = (f"{c['arm']} vs {c['reference']} on {c['model']}: first losses {_losses(c['losses'])} vs "
                f"{_losses(c['reference_losses'])}, max relative difference {c['max_rel_diff']:.2e} "
                f"(tolerance {c['tolerance']:.0e})")
        lines.append(f"**LOSS MISMATCH: {text}**" if c["mismatch"] else f"ok: {text}")
    return lines


def _losses(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def table(summary: dict, baseline: str) -> list[str]:
    head = ["model", "arm", "real tokens/s (median)", "p10-p90", f"ratio vs {baseline} [95% CI]",
            "tokens/s with padding", "padding", "s/step",
            "peak alloc GiB", "reserved GiB", "NVML GiB", "load s", "first step s", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary["rows"]:
        if not r.get("ok_runs"):
            cells = [r["model"], r["arm"], r["status"].upper()] + [""] * (len(head) - 4) + [f"{r['runs']}"]
        else:
            ratio = (f"{r['ratio']:.2f} [{r['ratio_lo']:.2f}, {r['ratio_hi']:.2f}]" if "ratio" in r else "n/a")
            cells = [r["model"], r["arm"], _fmt(r["tokens_per_s"]),
                     f"{_fmt(r['tokens_per_s_p10'])}-{_fmt(r['tokens_per_s_p90'])}", ratio,
                     _fmt(r.get("padded_tokens_per_s")), _fmt(r.get("padding"), ".1%"),
                     _fmt(r["step_s"], ".3f"), _fmt(r["peak_allocated_gib"], ".2f"),
                     _fmt(r["peak_reserved_gib"], ".2f"), _fmt(r["nvml_process_gib"] or r["nvml_device_gib"], ".2f"),
                     _fmt(r["load_s"], ".1f"), _fmt(r["first_step_s"], ".2f"),
                     f"{r['ok_runs']}/{r['runs']}" + ("" if r["status"] == "ok" else f" ({r['status']})")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def process_spread_lines(summary: dict) -> list[str]:
    """What the table's intervals cover: with one process for an (arm, model), only the spread of its steps (a
    second process of the same arm may run faster or slower than the whole interval); with several, the
    largest difference between the medians of one arm's processes."""
    rows = [r for r in summary["rows"] if r.get("ok_runs")]
    single = [f"{r['arm']} on {r['model']}" for r in rows if r["ok_runs"] == 1]
    lines = []
    if single:
        which = "every arm" if len(single) == len(rows) else ", ".join(single)
        lines.append(f"One process for {which}: its interval covers the spread of the steps within that "
                     "process only, not the spread between processes of the same arm, which can be wider; "
                     "`--repeats 2` or more measures it and widens the interval by it.")
    several = [r for r in rows if r["ok_runs"] > 1 and r.get("repeat_spread") is not None]
    if several:
        widest = max(several, key=lambda r: r["repeat_spread"])
        lines.append(f"Between processes of one arm, the median tokens/s differed by up to "
                     f"{widest['repeat_spread']:.1%} ({widest['arm']} on {widest['model']}).")
    return lines


def scaling_lines(summary: dict, unit: str = "GPU") -> list[str]:
    """One line per job of several ranks (one ``unit`` each): its real tokens/s, per rank, and the factor
    against one rank."""
    lines = []
    for s in summary.get("scaling", []):
        head = (f"{s['arm']} on {s['model']}: {s['world_size']} {unit}s {s['tokens_per_s']:,.0f} real tokens/s "
                f"({s['tokens_per_s_per_gpu']:,.0f} per {unit})")
        if "factor" in s:
            lines.append(f"{head} vs {s['single']} on 1 {unit} {s['single_tokens_per_s']:,.0f}: scaling "
                         f"{s['factor']:.2f}x ({s['efficiency']:.0%} of linear)")
        else:
            lines.append(f"{head}; {s['single']} on 1 {unit} did not finish: no scaling factor")
    return lines


def data_lines(compare: dict) -> list[str]:
    """What the arms trained on: random tokens (nothing to say), or the data file, its hash, and per model
    the tokenizer, the examples' lengths and how many examples a step took."""
    data = compare.get("data")
    if not data:
        return []
    run = compare["run"]
    lines = [f"data: {data['name']} ({data['bytes']:,} bytes, sha256 {data['sha256'][:16]}); a step is the next "
             f"examples that pack into {run['batch'] * run['grad_accum']} rows of {run['seq_len']} tokens, the same "
             "in every arm: packed for the fused arms" + (" (packing off: padded)" if not run.get("packing", True)
                                                         else "") + f", {run['batch']} examples per padded "
             "micro-batch for the others"]
    for model, st in data["models"].items():
        n = st["lengths"]
        per_step = st["examples_per_step"]
        lines.append(f"data on {model}: {st['examples']} {st['format']} examples of {n['min']}-{n['max']} tokens "
                     f"(median {n['median']}, p10 {n['p10']}, p90 {n['p90']}, mean {n['mean']}), {st['truncated']} "
                     f"truncated at {run['seq_len']}, {st['dropped_without_labels']} dropped without a label left; "
                     f"{min(per_step)}-{max(per_step)} examples per step; tokenizer: {st['tokenizer']}")
    return lines


def profile_lines(results: dict) -> list[str]:
    """"Where the time goes": per model, a table of ms and % of the profiled step per region and arm
    (the mean over the arm's profiled processes), the step's time profiled and timed, and the largest
    unclassified kernels per arm."""
    from fastbench.bench.profile import NAMES

    profiled = [r for r in results["runs"] if "ms" in (r.get("profile") or {})]
    failed = [r for r in results["runs"] if "error" in (r.get("profile") or {})]
    if not profiled and not failed:
        return []
    lines = ["## Where the time goes", ""]
    if profiled:
        lines.append("One extra step per process under torch.profiler, after the timed ones and in no other "
                     "figure: " + ("device kernel time summed over streams (overlapped copies count in full)"
                                   if profiled[0]["profile"]["activity"] == "cuda" else "CPU self time per op")
                     + ", by kernel name (fastbench.bench.profile.REGIONS); mean over the profiled processes.")
    step_s = {(r["model"], r["arm"]): r.get("step_s") for r in (results.get("summary") or {}).get("rows", [])}
    for model in dict.fromkeys(r["model"] for r in profiled):
        arms: dict[str, list[dict]] = {}
        for r in profiled:
            if r["model"] == model:
                arms.setdefault(r["arm"], []).append(r["profile"])
        mean = {arm: {k: sum(p["ms"].get(k, 0.0) for p in ps) / len(ps) for k in NAMES} for arm, ps in arms.items()}
        head = ["region"] + [f"{arm} {unit}" for arm in arms for unit in ("ms", "%")]
        lines += ["", f"### {model}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for region in NAMES + ("total",):
            cells = [f"**{region}**" if region == "total" else region]
            for ms in mean.values():
                total = sum(ms.values())
                value = total if region == "total" else ms[region]
                cells += [_fmt(value, ",.1f"), _fmt(100 * value / total if total else None, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for arm, ps in arms.items():
            timed = step_s.get((model, arm))
            others = ", ".join(f"`{n[:80]}` {t:,.1f} ms" for n, t in ps[0]["top_other"][:4])
            hosts = [p["host"] for p in ps if "host" in p]  # absent in files from before it was measured
            host = ""
            if hosts:
                issue, step = (sum(h[k] for h in hosts) / len(hosts) for k in ("issue_ms", "step_ms"))
                host = (f"; host CPU issued an unprofiled step in {issue:,.1f} of its {step:,.1f} ms "
                        f"({100 * issue / step:.0f}%{': CPU-bound' if issue >= 0.95 * step else ''})")
                busy = [p["gpu_busy_ms"] for p in ps if p.get("gpu_busy_ms") is not None]
                if busy:
                    mean_busy = sum(busy) / len(busy)
                    host += (f"; the GPU's compute stream ran kernels for {mean_busy:,.1f} ms of it "
                             f"(idle {max(0.0, step - mean_busy):,.1f} ms: waiting for the host or other streams)")
                waits = [(h["copy_wait_ms"], h["fetch_wait_ms"]) for h in hosts
                         if h.get("copy_wait_ms") is not None]
                if waits:
                    copy, fetch = (sum(w[i] for w in waits) / len(waits) for i in (0, 1))
                    host += (f"; of that step the compute stream waited {copy:,.1f} ms for copies to the host "
                             f"(the copy queue full) and {fetch:,.1f} ms for inputs fetched back")
            lines.append(f"- {arm}: profiled step {sum(p['wall_ms'] for p in ps) / len(ps):,.1f} ms wall "
                         f"(profiler overhead included), timed steps {_fmt(timed and 1e3 * timed, ',.1f')} ms median"
                         + host + (f"; largest 'other': {others}" if others else ""))
    lines += [f"- profiling failed for {r['arm']} on {r['model']}, repeat {r['repeat'] + 1}: "
              f"{r['profile']['error'][:300]}" for r in failed]
    return lines


def plot(summary: dict, path_stem: str) -> list[str]:
    """Write <stem>-tokens_per_s.png and <stem>-peak_memory.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in summary["rows"] if r.get("ok_runs")]
    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    arms = list(dict.fromkeys(r["arm"] for r in summary["rows"]))
    names = []
    for metric, lo, hi, ylabel, suffix in (
            ("tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "tokens/s (median, p10-p90)", "tokens_per_s"),
            ("peak_reserved_gib", "peak_reserved_gib_min", "peak_reserved_gib_max",
             "peak reserved GiB (median, min-max)", "peak_memory")):
        if not any(r.get(metric) is not None for r in rows):
            continue  # no CUDA memory figures on a CPU
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(models) * len(arms)), 3.6))
        width = 0.8 / max(1, len(arms))
        for j, arm in enumerate(arms):
            xs, ys, errs = [], [], [[], []]
            for i, model in enumerate(models):
                r = next((r for r in rows if r["model"] == model and r["arm"] == arm and r.get(metric) is not None),
                         None)
                if r is None:
                    continue
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                ys.append(r[metric])
                errs[0].append(r[metric] - r[lo])
                errs[1].append(r[hi] - r[metric])
            if xs:
                ax.bar(xs, ys, width, yerr=np.array(errs), capsize=3, label=arm)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        fig.tight_layout()
        name = f"{os.path.basename(path_stem)}-{suffix}.png"
        with atomic_path(os.path.join(os.path.dirname(path_stem), name)) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        names.append(name)
    return names


def compile_lines(results: dict) -> list[str]:
    """The processes whose first step compiled Triton kernels (a cold Triton cache, as on a fresh machine):
    their first step times the compiler too."""
    runs = [r for r in results["runs"] if r["status"] == "ok" and r.get("first_step_compiles")]
    if not runs:
        return []
    return ["", "First steps that compiled Triton kernels (their time includes the compiler; later processes "
                "find them in Triton's cache): " + "; ".join(
                    f"{r['arm']} on {r['model']}, repeat {r['repeat'] + 1}: {r['first_step_compiles']} kernels, "
                    f"{r['first_step_s']:.2f} s" for r in runs) + "."]


def plan_lines(results: dict) -> list[str]:
    """The checkpointing plan each budget-mode process trained its last step with (``ckpt=auto`` plans within
    the card's free memory: another card, or other processes on it, may plan otherwise)."""
    runs = [r for r in results["runs"] if r["status"] == "ok" and r.get("checkpointing_plan")]
    if not runs:
        return []
    return ["", "## Checkpointing plans", "",
            "What the budget mode chose for the last timed step (`ckpt=auto` plans within the free memory of "
            "this card, so another card may train the same arm with another plan):", ""] + [
        f"- {r['arm']} on {r['model']}, repeat {r['repeat'] + 1}: {r['checkpointing_plan']}" for r in runs]


def busy_lines(results: dict) -> list[str]:
    """Per process: its median step beside how busy the CPUs and the GPU were meanwhile (fastbench.bench.busy)."""
    runs = [r for r in results["runs"] if r["status"] == "ok"
            and any(r.get(k) is not None for k in ("host_own_cores", "gpu_busy_pct"))]
    if not runs:
        return []
    cpus = results["environment"].get("cpu_count")
    columns = [("gpu_busy_pct", ".0f"), ("host_own_cores", ".2f"), ("host_other_cores", ".2f"),
               ("host_steal_pct", ".1f")]
    waits = any(r.get("offload_queue_waits") is not None for r in runs)
    columns += [("offload_queue_waits", ".1f")] if waits else []
    power = any(r.get("gpu_energy_j") is not None for r in runs)
    columns += [("gpu_power_w", ".0f"), ("gpu_power_capped_pct", ".0f"), ("gpu_thermal_capped_pct", ".0f")] \
        if power else []
    lines = ["", "## How busy the machine was during the timed steps", "",
             "A slow process next to busy cores points at the host, not the code; a GPU busy well under 100% "
             "waited for its host. Cores: CPU seconds per second of the timed steps"
             + (f", of {cpus} on this machine" if cpus else "") + "; GPU busy: the share of time a kernel ran "
             "(NVML)"
             + ("; copy queue full: per step, how many of the offload mode's copies to the host the compute "
                "stream had to wait for (their sources hold a bounded amount of GPU memory, and the bus was "
                "behind the compute); fused arms only" if waits else "")
             + ("; GPU W and limited %: the GPU's mean power and the share of the time its power limit or its "
                "temperature held the clocks down (NVML, the whole GPU); energy: the GPU's joules per timed step, "
                "and per 1,000 tokens trained (a job on several GPUs: rank 0's energy times their number). A GPU "
                "held at its power limit most of the time runs a step in about the time its energy takes at that "
                "limit: there less work, not fewer waits for the host, makes a step faster" if power else "")
             + ".", "",
             "| model | arm | repeat | median step s | GPU busy % | this process's cores | other processes' cores "
             "| steal % |" + (" copy queue full, waits/step |" if waits else "")
             + (" GPU W | power-limited % | thermal-limited % | J/step | J per 1k tokens |" if power else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if waits else "")
             + (" --- |" * 5 if power else "")]
    for r in runs:
        cells = [_fmt(r.get(k), spec) for k, spec in columns]
        if power:
            energy, tokens = r.get("gpu_energy_j"), sum(r.get("tokens_per_step") or [])
            job = None if energy is None else energy * (r.get("world_size") or 1)  # rank 0's GPU stands for each
            cells += [_fmt(None if energy is None else energy / len(r["step_s"]), ".1f"),
                      _fmt(None if job is None or not tokens else 1e3 * job / tokens, ".1f")]
        lines.append(f"| {r['model']} | {r['arm']} | {r['repeat'] + 1} | {statistics.median(r['step_s']):.3f} | "
                     + " | ".join(cells) + " |")
    return lines


def allocator_line(results: dict) -> str:
    """The allocator setting every process got, and any process whose arm changed it (Unsloth sets its own)."""
    conf = results["compare"].get("alloc_conf")
    text = (f"PYTORCH_ALLOC_CONF={conf} in every process" if conf
            else "PyTorch's defaults in every process (PYTORCH_ALLOC_CONF unset)")
    changed = sorted({f"{r['arm']}: {r['alloc_env']}" for r in results["runs"]
                      if r.get("alloc_env") and set(r["alloc_env"].values()) != {conf}})
    return text + (f"; changed inside the process by {', '.join(changed)}" if changed else "")


def against_lines(against: dict, regressions: list[dict] | None) -> list[str]:
    """What was compared with the earlier run, the configuration changes allowed, and the regressions."""
    compared = against.get("compared", [])
    lines = [f"- compared: {', '.join(f'{arm} on {model}' for model, arm in compared) or 'nothing'}"]
    lines += [f"- configuration change (allowed): {change}" for change in against.get("config_changes", [])]
    lines += [f"- **{describe_regression(r)}**" for r in regressions or []]
    if compared and not regressions:
        lines.append("- no regression")
    return lines


def write_report(results: dict, reports_dir: str, regressions: list[dict] | None = None,
                 against: str | None = None) -> str:
    os.makedirs(reports_dir, exist_ok=True)
    summary, compare, env = results["summary"], results["compare"], results["environment"]
    run = compare["run"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [f"# fastbench compare {results['id']}", "",
             f"- status: {results['status']}; created {results['created']}",
             f"- GPU: {env['gpu'] or 'none (CPU)'}; driver {env['driver'] or 'n/a'}; CUDA {env['cuda'] or 'n/a'}",
             f"- versions: {versions}; git {env['git_sha'] or 'n/a'}{' (dirty)' if env.get('git_dirty') else ''}",
             f"- switches: {format_switches(env.get('switches'))}",
             f"- host: {format_host(env.get('host'))}",
             f"- allocator: {allocator_line(results)}",
             f"- models {', '.join(compare['models'])}; arms {', '.join(compare['arms'])}"
             + "".join(f"; {arm} on {', '.join(models)} only" for arm, models in compare.get("arm_models", {}).items())
             + f"; {compare['repeats']} repeats, {run['warmup']} warm-up + {run['steps']} timed steps",
             f"- seq {run['seq_len']}, batch {run['batch']}, grad accum {run['grad_accum']}, LoRA r={run['lora_r']} "
             f"alpha={run['lora_alpha']} dropout={run['lora_dropout']} on {', '.join(run['targets'])}, lr {run['lr']}, "
             f"{run['dtype']}, checkpointing {'on' if run['gradient_checkpointing'] else 'off'}, seed {run['seed']}, "
             + (f"padding {run['pad_fraction']:.0%}" if not run.get("data") else "a data file (below)")]
    lines += [f"- {line}" for line in data_lines(compare)] + [""]
    if not env["gpu"]:
        lines += [f"> {CPU_NOTE}", ""]
    lines += table(summary, compare["baseline_arm"]) + [""]
    spread = process_spread_lines(summary)
    if spread:
        lines += spread + [""]
    lines += ["## Losses of the first steps", ""] + [f"- {x}" for x in loss_lines(summary) or ["nothing to compare"]]
    if summary.get("scaling"):
        lines += ["", "## Scaling over GPUs", "",
                  "Each job of N ranks (torch.distributed DDP, one process per GPU) trains N x the rows of one "
                  "GPU per step; tokens/s are the whole job's, real tokens only. Its losses are not compared "
                  "with the other arms' (other rows)."]
        lines += [""] + [f"- {line}" for line in scaling_lines(summary, "GPU" if env["gpu"] else "CPU rank")]
    if summary["noise_floor"]:
        lines += ["", "## A/A noise floor", ""]
        lines += [f"- {n['twin']} / {n['arm']} on {n['model']}: tokens/s ratio {n['ratio']:.3f} "
                  f"[{n['ratio_lo']:.3f}, {n['ratio_hi']:.3f}]; peak reserved memory differs by {n['memory_noise']:.2%}"
                  for n in summary["noise_floor"]]
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Processes that did not finish", ""]
        lines += [f"- {r['arm']} on {r['model']}, repeat {r['repeat'] + 1}: {r['status']} in {r['phase']}: "
                  f"{(r['error'] or '').splitlines()[0][:300] if r['error'] else ''}" for r in failed]
    if against is not None:
        lines += ["", f"## Against {against}", ""] + against_lines(results.get("against") or {}, regressions)
    profile = profile_lines(results)
    if profile:
        lines += [""] + profile
    lines += compile_lines(results) + plan_lines(results) + busy_lines(results)
    tiers = {r["arm"]: r["autotune_tiers"] for r in results["runs"] if r.get("autotune_tiers")}
    if tiers:
        lines += ["", "## Autotune tier per op", ""] + [f"- {arm}: {t}" for arm, t in tiers.items()]
    stem = os.path.join(reports_dir, results["id"])
    if any(r.get("ok_runs") for r in summary["rows"]):
        lines += [""] + [f"![{name}]({name})" for name in plot(summary, stem)]
    path = stem + ".md"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
