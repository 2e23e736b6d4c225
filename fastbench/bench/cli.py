"""``fastbench compare``: controlled speed/VRAM comparisons of LoRA arms, results, reports and
regression checks."""
from __future__ import annotations

import dataclasses
import os

import click

from fastbench.chat_templates import TEMPLATE_NAMES
from fastbench.train.data import FORMATS as DATA_FORMATS

DEFAULT_ALLOC_CONF = "expandable_segments:True"  # less fragmentation; what Unsloth sets on import

# what a bare `fastbench compare` runs
GPU_DEFAULTS = dict(models="llama-3.2-1b", arms="peft,qlora", seq_len=2048, batch=2, steps=10, warmup=3, repeats=2)
CPU_DEFAULTS = dict(models="llama-3.2-1b-tiny", arms="peft,qlora", seq_len=128, batch=2, steps=4, warmup=1,
                    repeats=1)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _load(path: str) -> dict:
    from fastbench.bench import results as results_io

    try:
        return results_io.read(path)
    except results_io.BadResults as e:
        raise click.UsageError(str(e)) from None


def _resolve(opts: dict) -> dict:
    """The comparison config (the ``compare`` block of a results file) from options and defaults."""
    import torch

    from fastbench.bench.arms import RunConfig, get_arm, unique_labels

    cuda = torch.cuda.is_available()
    device = opts["device"] or ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        raise click.UsageError(f"--device {device}: no CUDA GPU is visible here")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    value = {k: (opts[k] if opts.get(k) is not None else defaults.get(k)) for k in opts}
    # the options named after a RunConfig field set it (--seq-len: seq_len, ...); the others shape the comparison
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"model", "device", "arm_options"}
    run = RunConfig(device=device, **{k: v for k, v in value.items() if k in fields and v is not None})
    run.targets = tuple(_split(run.targets)) if isinstance(run.targets, str) else run.targets
    labels = unique_labels(_split(value["arms"] or ""))
    models = _split(value["models"] or "")
    if not labels or not models:
        raise click.UsageError("--arms and --models must each name at least one")
    nproc = value.get("nproc") or 1
    if nproc > 1:
        labels = _with_jobs_of(labels, nproc)
    baseline = value["baseline_arm"] or ("peft" if "peft" in labels else labels[0])
    if baseline not in labels:
        raise click.UsageError(f"--baseline-arm {baseline!r} is not among --arms ({', '.join(labels)})")
    if value["repeats"] <= 0:
        raise click.UsageError(f"repeats must be positive, got {value['repeats']}")
    from fastbench.bench.stats import LOSS_TOLERANCE

    tol = dict(LOSS_TOLERANCE)
    if value.get("loss_tolerance") is not None:
        tol = {"same": value["loss_tolerance"], "cross": max(value["loss_tolerance"], tol["cross"])}
    compare = {"models": models, "arms": labels, "repeats": value["repeats"], "baseline_arm": baseline,
               "loss_tolerance": tol, "run": {k: v for k, v in run.to_dict().items() if k != "model"},
               "arm_models": _arm_models(value.get("arm_models") or (), labels, models)}
    compare["kinds"] = {label: get_arm(label, check_installed=False).loss_kind for label in labels}
    compare["alloc_conf"] = _alloc_conf(value["alloc_conf"])
    compare["nproc"] = nproc
    compare["dist_backend"] = value.get("dist_backend") or ("nccl" if device.startswith("cuda") else None)
    return compare


def _with_jobs_of(labels: list[str], nproc: int) -> list[str]:
    """``labels`` with, after each arm that runs as a job of ranks (the fused ones), the same arm as a job of
    ``nproc`` ranks (``fused-4bit:ckpt=offload`` -> also ``fused-4bit:ckpt=offload:nproc=2``)."""
    from fastbench.bench.arms import NPROC_OPTION, UnknownArm, get_arm

    out = []
    for label in labels:
        out.append(label)
        try:
            takes = any(o.name == NPROC_OPTION for o in get_arm(label, check_installed=False).options)
        except UnknownArm:
            continue  # _validate names it
        if takes and NPROC_OPTION not in label.split("#")[0].split(":")[1:]:
            base, sep, twin = label.partition("#")
            out.append(f"{base}:{NPROC_OPTION}={nproc}{sep}{twin}")
    if len(out) == len(labels):
        raise click.UsageError(f"--nproc {nproc} measures how the fused arms scale over ranks; --arms names none "
                               "(fused, fused-4bit)")
    return out


def _alloc_conf(text: str) -> str | None:
    """--alloc-conf as the allocator reads it (key:value pairs, comma-separated), None for 'none'."""
    if text.strip().lower() == "none":
        return None
    pairs = [p.strip() for p in text.split(",")]
    if not all(k.strip() and v.strip() for k, sep, v in (p.partition(":") for p in pairs)):
        raise click.UsageError(f"--alloc-conf {text!r}: write key:value[,key:value], e.g. {DEFAULT_ALLOC_CONF}, "
                               "or none")
    return ",".join(pairs)


def _arm_models(specs, labels: list[str], models: list[str]) -> dict[str, list[str]]:
    """``("unsloth@llama-3-8b+mistral-7b", ...)`` -> {arm: [models it runs on]}; arms not named run on every model."""
    restricted = {}
    for spec in specs:
        label, at, names = spec.rpartition("@")
        chosen = [m.strip() for m in names.split("+") if m.strip()]
        if not at or not label or not chosen:
            raise click.UsageError(f"--arm-models {spec!r}: write ARM@MODEL[+MODEL...], e.g. unsloth@llama-3-8b")
        if label not in labels:
            raise click.UsageError(f"--arm-models {spec!r}: {label!r} is not among --arms ({', '.join(labels)})")
        unknown = [m for m in chosen if m not in models]
        if unknown:
            raise click.UsageError(f"--arm-models {spec!r}: {', '.join(unknown)} not among --models "
                                   f"({', '.join(models)})")
        restricted[label] = chosen
    return restricted


def _validate(compare: dict) -> None:
    """Every model and arm usable on this machine, every size sane; UsageError otherwise."""
    from fastbench.bench.arms import RunConfig, check_label, get_arm

    for label in compare["arms"]:
        check_label(label)
        get_arm(label)
    _check_ranks(compare)
    for model in compare["models"]:
        RunConfig.from_dict({**compare["run"], "model": model}).validate()


def _prepare_data(compare: dict) -> dict[str, dict]:
    """Per model, the steps of the data file (none for random tokens), and ``compare["data"]``: the file's
    name, path, size, hash and per model its length stats. A file that cannot be used, or one that changed
    since a results file recorded it, is a UsageError (exit 2) before any process starts."""
    from fastbench.bench import file_data
    from fastbench.bench.arms import RunConfig, world_size
    from fastbench.train.data import DataError

    run = compare["run"]
    if not run.get("data"):
        return {}
    path = run["data"]
    if not os.path.exists(path):
        raise click.BadParameter(f"{path}: no such file", param_hint="--data")
    described = file_data.describe_file(path)
    recorded = compare.get("data")
    if recorded and recorded["sha256"] != described["sha256"]:
        raise click.BadParameter(f"{path} is not the file the results were measured on (sha256 "
                                 f"{described['sha256'][:12]}, recorded {recorded['sha256'][:12]}); give that "
                                 "file", param_hint="--data")
    prepared = {}
    for model in compare["models"]:
        for ranks in sorted({world_size(label) for label in compare["arms"]}):
            try:
                prepared[model, ranks] = file_data.prepare(RunConfig.from_dict({**run, "model": model}),
                                                           run["warmup"] + run["steps"], ranks)
            except DataError as e:
                raise click.BadParameter(str(e), param_hint="--data") from None
    stats = {}
    for (model, _), p in prepared.items():  # the smallest job's plan, the one a single GPU trains
        stats.setdefault(model, p["stats"])
    compare["data"] = {**described, "models": stats}
    return prepared


def _check_ranks(compare: dict) -> None:
    """A job of N ranks needs N GPUs here (one each), or on a CPU run the gloo backend (a test of the
    pipeline); ValueError saying what to change otherwise."""
    from fastbench.bench.arms import world_size
    from fastbench.distributed.launch import check_nproc

    ranks = max(world_size(label) for label in compare["arms"])
    backend = compare.get("dist_backend")
    if compare["run"]["device"].startswith("cuda"):
        if ranks > 1:
            import torch

            check_nproc(ranks, torch.cuda.device_count())
        if backend == "gloo":
            raise ValueError("--dist-backend gloo is for CPU runs; GPU ranks join through nccl")
    elif ranks > 1 and backend != "gloo":
        raise ValueError(f"--nproc {ranks} on a CPU run: ranks of a CPU job join through gloo, which only tests "
                         "the pipeline; pass --dist-backend gloo for that, or run on GPUs")


def _check_against(results: dict, old: dict, path: str, allow_config_change: bool) -> list[str]:
    """Before anything runs: the configurations must match (else exit 2 naming what differs, unless
    allowed: then the differences are returned to be reported) and the runs must share a (model, arm)."""
    from fastbench.bench import regress

    changes = regress.config_differences(results, old)
    if changes and not allow_config_change:
        raise click.UsageError(f"--against {path} ran another configuration: {'; '.join(changes)}; compare like "
                               "with like, or pass --allow-config-change")
    if not regress.pairs_in_common(results, old):
        old_pairs = sorted({f"{r['arm']} on {r['model']}" for r in old["runs"] if r["status"] == "ok"})
        raise click.UsageError(f"--against {path} has nothing in common with this run: no arm on a model that "
                               f"finished there ({', '.join(old_pairs) or 'none finished'})")
    return changes


def summarize_results(results: dict) -> dict:
    from fastbench.bench.stats import summarize

    c = results["compare"]
    return summarize(results["runs"], c["arms"], c["models"], c["baseline_arm"], c["kinds"], c["loss_tolerance"],
                     c.get("arm_models"))


@click.command("compare")
@click.option("--models", "--model", "models", metavar="LIST",
              help="Comma-separated presets or local checkpoint directories "
                   "[GPU: llama-3.2-1b; CPU: llama-3.2-1b-tiny].")
@click.option("--arms", metavar="LIST", help="Comma-separated arm labels, e.g. peft,qlora,fused-4bit:ckpt=offload; "
                                             "repeat one (peft,peft) for an A/A run [peft,qlora].")
@click.option("--arm-models", "arm_models", multiple=True, metavar="ARM@MODELS",
              help="Run ARM only on these '+'-separated models, e.g. unsloth@llama-3-8b (repeatable) "
                   "[every arm on every model].")
@click.option("--seq-len", type=int, help="Tokens per sequence [GPU 2048; CPU 128].")
@click.option("--batch", type=int, help="Sequences per micro-batch [2].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--steps", type=int, help="Timed steps per process [GPU 10; CPU 4].")
@click.option("--warmup", type=int, help="Warm-up steps per process, reported apart [GPU 3; CPU 1].")
@click.option("--repeats", type=int, help="Processes per (arm, model) [GPU 2; CPU 1].")
@click.option("--lora-r", type=int, help="LoRA rank [16].")
@click.option("--lora-alpha", type=int, help="LoRA alpha [16].")
@click.option("--lora-dropout", type=float, help="LoRA dropout [0].")
@click.option("--targets", metavar="LIST", help="LoRA target modules [the 7 projections].")
@click.option("--lr", type=float, help="AdamW learning rate [2e-4].")
@click.option("--seed", type=int, help="Seed of the weights, LoRA init and data [0].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Compute dtype [bfloat16].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Activation checkpointing [on].")
@click.option("--device", help="cuda, cuda:N or cpu [cuda if available].")
@click.option("--pad-fraction", type=float, help="Mean fraction of right padding per sequence of random tokens [0].")
@click.option("--data", type=click.Path(), metavar="FILE",
              help="Train on this data file (.jsonl, .json, .csv, .parquet, .txt or a datasets.save_to_disk "
                   "directory; read, rendered and labelled as `fastbench train` does) instead of random tokens. "
                   "A step consumes the next examples of the file (shuffled with --seed) that pack into "
                   "batch x grad-accum rows of --seq-len tokens, the same examples for every arm: the fused arms "
                   "train them packed into such rows, the others (peft, qlora, unsloth, liger) as their users do, "
                   "--batch examples per micro-batch padded to the longest (all truncated at --seq-len). So a "
                   "step is the same real tokens in every arm, and real tokens/s (padding not counted) compares "
                   "the same work; the padding each arm carried is reported beside it. Tokenizer: a checkpoint's "
                   "own; for a preset, a byte-level BPE trained on the file (see --tokenizer).")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS),
              help="The records' format [detected from the first record].")
@click.option("--packing/--no-packing", default=None,
              help="With --data: the fused arms pack examples into rows (--no-packing: they pad like the "
                   "others) [packing].")
@click.option("--text-field", help="With --data: the field of text records [text].")
@click.option("--chat-template", type=click.Choice(TEMPLATE_NAMES),
              help="With --data: render conversations with this template instead of the tokenizer's "
                   "[the tokenizer's; a preset's built tokenizer: chatml].")
@click.option("--tokenizer", type=click.Path(file_okay=False), metavar="DIR",
              help="With --data: the tokenizer saved in DIR [a checkpoint's own; for a preset, a byte-level "
                   "BPE trained on the data file, up to the preset's vocab size].")
@click.option("--profile/--no-profile", default=None,
              help="After the timed steps, two more steps per process: one timed from an idle GPU (does "
                   "the host CPU bound the step? with offloaded checkpointing also: how long did the host wait "
                   "for copies out, the GPU for inputs fetched back?) and one profiled (time per region: "
                   "matmul, dequantize, attention, ...), both in the report; allowed with --from [off].")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Data-parallel scaling: each fused arm also runs as one job of N ranks (one process and GPU "
                   "each, torch.distributed DDP, NCCL), each rank training --batch rows per micro-batch, so the "
                   "job trains N times the rows of one GPU per step (with --data: the next examples that fill N x "
                   "batch x grad-accum rows). The report gives the job's real tokens/s, per GPU, and the scaling "
                   "factor against the same arm on one GPU in the same run; every result row records its world "
                   "size. N may not exceed the GPUs here [1].")
@click.option("--dist-backend", type=click.Choice(["nccl", "gloo"]),
              help="How ranks join: nccl (GPUs); gloo lets --nproc run on a CPU, as a test of the pipeline "
                   "[nccl].")
@click.option("--baseline-arm", help="Arm the ratios and loss checks refer to [peft].")
@click.option("--loss-tolerance", type=float, help="Relative tolerance of the first steps' losses against "
                                                    "an arm of the same kind [0.01; bf16 vs 4-bit: 0.02].")
@click.option("--from", "from_path", type=click.Path(dir_okay=False), help="Re-run the configuration of a results file.")
@click.option("--resume", "resume_path", type=click.Path(dir_okay=False),
              help="Finish a partial or interrupted results file: runs its missing processes and again those "
                   "that crashed or timed out, on the kind of GPU it started on (the file keeps that machine's "
                   "description); with nothing to run, writes its report again.")
@click.option("--against", "against_path", type=click.Path(dir_okay=False),
              help="Compare with an earlier results file; exit non-zero on a regression.")
@click.option("--max-regression", default="5%", show_default=True,
              help="Allowed tokens/s drop or peak-memory rise against --against (beyond the noise).")
@click.option("--allow-config-change", is_flag=True,
              help="Compare with --against although the configurations differ (seq-len, batch, dtype, allocator, "
                   "GPU, ...); without it such a comparison exits 2 naming what differs.")
@click.option("--alloc-conf", default=DEFAULT_ALLOC_CONF, show_default=True,
              help="PYTORCH_ALLOC_CONF of every process (the caching allocator's settings, the same for every arm, "
                   "recorded); 'none': PyTorch's defaults.")
@click.option("--results-dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--reports-dir", default="reports", show_default=True, type=click.Path(file_okay=False))
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds one process may take before it is stopped and recorded as 'timeout' (the run goes on; "
                   "--resume runs it again) [none].")
@click.pass_context
def compare(ctx, from_path, resume_path, against_path, max_regression, allow_config_change, results_dir, reports_dir,
            timeout, **opts):
    """Train each arm on each model for a few steps, every (arm, model, repeat) in a fresh process,
    and compare tokens/s, peak memory and the first losses against the baseline arm.

    Writes RESULTS_DIR/<date>-<gpu>-<id>.json (+ .csv) and REPORTS_DIR/<id>.md with plots. Exit code 1
    if an arm failed (other than out of memory), a loss mismatched, or --against found a regression;
    130 if interrupted, 143 on SIGTERM (the processes measured are kept). With no options: a short
    llama-3.2-1b peft vs qlora run on a GPU, the tiny preset on a CPU."""
    from fastbench.bench import regress, report, results as results_io
    from fastbench.bench.arms import MissingPackage, UnknownArm
    from fastbench.bench.runner import run_compare
    from fastbench.env import collect_environment
    from fastbench.interrupt import exit_code, sigterm_as_interrupt
    from fastbench.presets import NotAModel, UnknownPreset

    explicit = {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if from_path and resume_path:
        raise click.UsageError("--from and --resume exclude each other")
    saved = from_path or resume_path
    if from_path:
        explicit.discard("profile")  # a saved configuration re-run with (or without) the breakdown
    if saved and explicit:
        raise click.UsageError(f"--{'from' if from_path else 'resume'} runs the saved configuration; drop "
                               + ", ".join("--" + k.replace("_", "-") for k in sorted(explicit)))
    try:
        threshold = regress.parse_threshold(max_regression)
    except ValueError as e:
        raise click.UsageError(f"--max-regression: {e}") from None
    old = _load(against_path) if against_path else None
    try:
        if resume_path:
            results = _load(resume_path)
            compare_cfg = results["compare"]
        else:
            compare_cfg = _load(from_path)["compare"] if from_path else _resolve(opts)
        if from_path and opts["profile"] is not None:
            compare_cfg["run"]["profile"] = opts["profile"]
        _validate(compare_cfg)
    except (UnknownArm, MissingPackage, UnknownPreset, NotAModel, ValueError) as e:
        raise click.UsageError(str(e)) from None
    prepared = _prepare_data(compare_cfg)

    environment = collect_environment()
    if resume_path:  # the file keeps the machine its runs measured; the rest must run on the same kind
        ran_on = results["environment"].get("gpu")
        if ran_on != environment["gpu"]:
            raise click.UsageError(
                f"--resume {resume_path}: its runs ran on {ran_on or 'a CPU'} and this machine has "
                f"{environment['gpu'] or 'no GPU'}: resume it on the kind of machine it started on (figures "
                "from two kinds are not comparable), or start a new run with --from")
    else:
        results = results_io.new_results(results_io.new_run_id(environment), compare_cfg, environment)
    config_changes = _check_against(results, old, against_path, allow_config_change) if old is not None else []
    for directory, option in ((results_dir, "--results-dir"), (reports_dir, "--reports-dir")):
        try:  # before the first process: what it measures must have somewhere to go
            results_io.check_writable(directory, option)
        except results_io.BadResults as e:
            raise click.UsageError(str(e)) from None
    if not environment["gpu"]:
        click.echo(f"note: {report.CPU_NOTE}")
    click.echo(f"fastbench compare {results['id']}: {', '.join(compare_cfg['arms'])} on "
               f"{', '.join(compare_cfg['models'])}, {compare_cfg['repeats']} repeat(s)")
    for line in report.data_lines(compare_cfg):
        click.echo(line)
    with sigterm_as_interrupt() as stop:  # a scheduler's SIGTERM keeps what was measured, as Ctrl-C does
        finished = run_compare(results, results_dir, timeout=timeout, prepared=prepared)

    results["summary"] = summarize_results(results)
    regressions = None
    if old is not None:
        old["summary"] = summarize_results(old)
        regressions = regress.find_regressions(results, old, threshold)
        results["against"] = {"path": against_path, "id": old["id"], "max_regression": threshold,
                              "compared": [list(p) for p in regress.pairs_in_common(results, old)],
                              "config_changes": config_changes, "regressions": regressions}
    json_path = results_io.write(results, results_dir)
    report_path = report.write_report(results, reports_dir, regressions, against_path)

    summary = results["summary"]
    click.echo("")
    click.echo("\n".join(report.table(summary, compare_cfg["baseline_arm"])))
    for line in report.loss_lines(summary) + report.scaling_lines(
            summary, "GPU" if environment["gpu"] else "CPU rank"):
        click.echo(line.replace("**", ""))
    if old is not None:
        click.echo(f"against {against_path}: {len(results['against']['compared'])} arm/model pair(s) compared"
                   + "".join(f"; configuration change allowed: {c}" for c in config_changes))
    for r in regressions or []:
        click.echo(regress.describe(r))
    click.echo(f"\nresults: {json_path}\nreport:  {report_path}")
    if not finished:
        ctx.exit(exit_code(stop))
    failed = [r for r in results["runs"] if r["status"] not in ("ok", "oom")]
    problems = ([f"{r['arm']} on {r['model']} (repeat {r['repeat'] + 1}) {r['status']}" for r in failed]
                + [f"loss mismatch: {c['arm']} vs {c['reference']} on {c['model']}"
                   for c in summary["loss_checks"] if c["mismatch"]]
                + [regress.describe(r) for r in regressions or []])
    if problems:
        click.echo("FAILED: " + "; ".join(problems), err=True)
        ctx.exit(1)

