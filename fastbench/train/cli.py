"""``fastbench train``: LoRA/QLoRA fine-tuning on the fused path.

Everything a user can get wrong (options, config file, output directory, checkpoint to resume, data
records, tokenizer and template) is checked before the model loads; each is one line naming what and
where, exit 2. The adapter is saved to --output at the end, when a step fails (the finished steps'; out of
memory says what to change), when a step's loss is NaN/inf (``--on-nan stop``) and on Ctrl-C or SIGTERM,
including while the model loads (exit 130 / 143).

Several processes (``--nproc N``, or started by torchrun): this process checks the options, the output and
the checkpoint, then launches N processes of itself through torch.distributed.run
(fastbench.distributed.launch), each of which finds torchrun's variables, joins the world, trains its share of
every step under DDP and leaves the files to rank 0. A signal reaches every process (the launcher passes
it on); a process that fails stops the job, and the launcher exits with its exit code.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings

import click

from fastbench.chat_templates import TEMPLATE_NAMES
from fastbench.interrupt import exit_code, sigterm_as_interrupt
from fastbench.presets import DEFAULT_TARGETS
from fastbench.train.config import apply_config, save_effective_config
from fastbench.train.data import FORMATS

# files an earlier run leaves in --output that --overwrite replaces
RUN_FILES = ("train_log.jsonl", "loss.png")


def parse_checkpointing(value):
    from fastbench.fused.checkpointing import setting_from_text

    try:
        return setting_from_text(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--checkpointing") from None


def _echo_warnings(caught) -> None:
    for w in caught:
        click.echo(f"note: {w.message}", err=True)


def _data_error(error, option="--data"):
    return click.BadParameter(str(error), param_hint=option)


# ------------------------------------------------------------------------------------------- checks
def check_output(output: str, resume: bool, overwrite: bool):
    """Refuses an --output that is a file, not writable, or (without --resume/--overwrite) already holds
    files. Returns the latest checkpoint's path when resuming from one, else None. Creates nothing."""
    from fastbench.train.checkpoint import checkpoints

    if os.path.exists(output) and not os.path.isdir(output):
        raise click.BadParameter(f"{output!r} is a file; give a directory", param_hint="--output")
    existing = os.path.abspath(output)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{output!r}: {existing} is not writable", param_hint="--output")
    found = checkpoints(output)
    held = [n for n in os.listdir(output) if not n.startswith(".")] if os.path.isdir(output) else []
    if resume:
        if found:
            return found[-1][1]
        if held:
            raise click.BadParameter(f"{output!r} holds files but no checkpoint-N/ to resume from; use --overwrite "
                                     "to start over there, or another --output", param_hint="--output")
        click.echo(f"note: nothing to resume in {output!r}; starting from step 0", err=True)
        return None
    if held and not overwrite:
        raise click.BadParameter(f"{output!r} already holds files ({', '.join(sorted(held)[:3])}"
                                 f"{', ...' if len(held) > 3 else ''}); pass --resume to continue that run or "
                                 "--overwrite to start over", param_hint="--output")
    return None


def check_gguf(method: str, source, data: str, tokenizer=None) -> None:
    """--gguf refused before the model loads: an unknown method, a family llama.cpp has no architecture for, no
    tokenizer to write into the file (--data random loads none), or (given ``tokenizer``) one llama.cpp cannot
    read."""
    from fastbench.export.gguf_file import GGUF_ARCHS
    from fastbench.export.schemes import get_scheme
    from fastbench.export.tokenizer_metadata import tokenizer_metadata

    try:
        get_scheme(method)
        if source.model_type and source.model_type not in GGUF_ARCHS:
            raise ValueError(f"GGUF export supports the model types {', '.join(GGUF_ARCHS)}; {source.name} is "
                             f"{source.model_type!r}")
        if data == "random":
            raise ValueError("a GGUF holds the tokenizer's vocabulary, and --data random loads no tokenizer: train "
                             "on a data file, or drop --gguf")
        if tokenizer is not None:
            tokenizer_metadata(tokenizer, source.vocab_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gguf") from None


def clear_previous_run(output: str) -> None:
    """--overwrite: removes the checkpoints and log an earlier run left (the adapter files are replaced
    when this run saves)."""
    from fastbench.train.checkpoint import checkpoints

    for _, path in checkpoints(output):
        shutil.rmtree(path)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(output, name)):
            os.remove(os.path.join(output, name))


def load_tokenizer(source, chat_template, trust_remote_code):
    from fastbench.train.data import DataError, NoTokenizer, load_saved_tokenizer

    if source.path is None:
        raise click.BadParameter(f"{source.name} is a preset: random weights and no tokenizer; data needs "
                                 "a checkpoint directory with a tokenizer (or use --data random)", param_hint="--data")
    try:
        tokenizer = load_saved_tokenizer(source.path, source.name, trust_remote_code)
    except NoTokenizer as e:
        raise click.ClickException(f"{e}, which the data needs") from None
    except DataError as e:
        raise click.ClickException(str(e)) from None
    if chat_template:
        from fastbench.chat_templates import get_chat_template

        get_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token_id is None:
        pick = next((t for t in ("eos_token", "unk_token") if getattr(tokenizer, t, None) is not None), None)
        if pick is None:
            raise click.ClickException(f"the tokenizer of {source.name} has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = getattr(tokenizer, pick)
        click.echo(f"note: the tokenizer has no pad token; padding with its {pick.split('_')[0].upper()} token "
                   f"{tokenizer.pad_token!r} (padding carries no labels)", err=True)
    return tokenizer


def load_examples(path, tokenizer, fmt, text_field, train_on_inputs, max_seq_length, option="--data"):
    """(examples, format, truncated count) of a data file; click errors for bad records."""
    from fastbench.train.data import DataError, detect_format, encode_records, read_records, truncate

    try:
        records = read_records(path, text_field)
        if not records:
            raise DataError(f"{path!r} has no examples")
        fmt = fmt or detect_format(records, text_field)
        examples = encode_records(records, tokenizer, fmt, text_field, train_on_inputs)
    except DataError as e:
        raise _data_error(e, option) from None
    if not examples:
        raise click.BadParameter(f"{path!r} has no examples (of 2 tokens or more)", param_hint=option)
    return examples, fmt, truncate(examples, max_seq_length)


def split_eval(examples, fraction: float, seed: int):
    """(train, eval): a seeded random ``fraction`` of the examples held out (at least one)."""
    import random

    order = list(range(len(examples)))
    random.Random(f"{seed}:eval").shuffle(order)
    held = max(1, round(fraction * len(examples)))
    if held >= len(examples):
        raise click.BadParameter(f"{fraction} of {len(examples)} examples leaves none to train on",
                                 param_hint="--eval-fraction")
    chosen = set(order[:held])
    return [e for i, e in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)]


def load_model(source, max_seq_length, load_in_4bit, seed, rank, target_modules, lora_alpha, checkpointing,
               trust_remote_code, allow_pickle, say=True, offload_host_gib=None):
    from fastbench import FastLanguageModel
    from fastbench.memory import is_out_of_memory

    extra = {}  # passed only when set, so loaders without these keywords still work
    if trust_remote_code:
        extra["trust_remote_code"] = True
    if allow_pickle:
        extra["allow_pickle"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                base, _ = FastLanguageModel.from_pretrained(source.path or source.name, max_seq_length=max_seq_length,
                                                            load_in_4bit=load_in_4bit, seed=seed, **extra)
            except (ImportError, OSError) as e:  # bitsandbytes missing for --load-in-4bit, an unreadable checkpoint
                raise click.ClickException(f"cannot load {source.name}: {e}") from None
            try:
                model = FastLanguageModel.get_peft_model(base, r=rank, target_modules=target_modules,
                                                         lora_alpha=lora_alpha, random_state=seed,
                                                         use_gradient_checkpointing=checkpointing,
                                                         offload=None if offload_host_gib is None
                                                         else {"host_limit_gib": offload_host_gib})
            except ValueError as e:  # PEFT: a target module that does not exist
                raise click.BadParameter(str(e), param_hint="--targets") from None
        except Exception as e:  # on the GPU: the weights, or what the fused path sets up, do not fit
            if not is_out_of_memory(e):
                raise
            smaller = "a smaller model" if load_in_4bit else "--load-in-4bit (NF4 base weights) or a smaller model"
            raise click.ClickException(f"out of GPU memory loading {source.name}, before training started; use "
                                       f"{smaller}, or free the GPU of other processes") from None
    if say:
        _echo_warnings(w for w in caught if issubclass(w.category, UserWarning))
        for line in getattr(model.get_base_model(), "fastbench_patches", ["plain PEFT (no fused path)"]):
            click.echo(f"fastbench: {line}", err=True)
    return model


def summary_line(state, output, started, world_size=1) -> str:
    import torch

    rate = state.tokens / state.seconds if state.seconds else 0.0
    parts = [f"{state.done} steps", f"{rate:,.0f} real tokens/s"]
    if world_size > 1:
        parts[-1] += f" on {world_size} processes"
    if torch.cuda.is_available():
        parts.append(f"peak reserved GPU memory {torch.cuda.max_memory_reserved() / 2 ** 30:.2f} GiB")
    parts.append(f"{time.monotonic() - started:.0f} s")
    if state.eval_loss is not None:
        parts.append(f"eval loss {state.eval_loss:.4f} (perplexity {math.exp(min(state.eval_loss, 700.0)):.2f})")
    if state.skipped:
        parts.append(f"{state.skipped} non-finite steps skipped")
    return "; ".join(parts) + f"; adapter saved to {output}"


# ------------------------------------------------------------------------------------------- command
@click.command("train")
@click.argument("model")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=apply_config,
              help="A .yaml, .toml or .json file of options (keys as the option names: max_seq_length, grad_accum, "
                   "...); the command line overrides it.")
@click.option("--data", required=True, help="Training data: a .jsonl, .json (a list), .csv, .parquet or .txt file "
              "(one example per line), a datasets.save_to_disk directory, or 'random' (random token ids; presets, "
              "smoke tests; needs --steps).")
@click.option("--format", "data_format", type=click.Choice(FORMATS),
              help="The records' format (default: detected from the first record).")
@click.option("--text-field", default="text", show_default=True, help="The field of text records to train on.")
@click.option("--chat-template", type=click.Choice(TEMPLATE_NAMES),
              help="Render conversations with this template (for a tokenizer without one, or to replace its own).")
@click.option("--train-on-inputs", is_flag=True, help="Take the loss on every token, not only the assistant's.")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Pack several examples into each row of --max-seq-length tokens (each attends only to itself).")
@click.option("--output", required=True, type=click.Path(), help="Where the adapter, checkpoints, train_log.jsonl "
              "and loss.png go.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint-N/ under --output.")
@click.option("--overwrite", is_flag=True, help="Start over in an --output that holds an earlier run.")
@click.option("--max-seq-length", default=2048, show_default=True, type=click.IntRange(min=2),
              help="The row length; longer examples are truncated (and counted). The length of random sequences.")
@click.option("--load-in-4bit", is_flag=True, help="QLoRA: quantize the base weights to NF4.")
@click.option("--r", "rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--lora-alpha", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--targets", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Comma-separated module names that get LoRA adapters.")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1),
              help="Rows (packed) or examples (--no-packing) per micro-batch.")
@click.option("--grad-accum", default=4, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs 1).")
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over the data (a short last step each).")
@click.option("--warmup-steps", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--checkpointing", default="true", show_default=True, callback=lambda c, p, v: parse_checkpointing(v),
              help="Activation checkpointing: true (recompute every layer), false, offload (recompute, with the "
                   "inputs and every 4th layer's MLP activations kept in pinned CPU memory), auto, or "
                   "a memory budget in GiB.")
@click.option("--offload-host-gib", type=click.FloatRange(min=0, min_open=True),
              help="With --checkpointing offload: the most pinned host memory each process's offloaded activations "
                   "may hold. A forward that would need more (two layer inputs a layer) keeps one a layer and "
                   "recomputes whole layers; past even that it stops with an error. Default: what the host has "
                   "available (less 2 GiB); with --nproc N, each process's even share of it.")
@click.option("--seed", default=3407, show_default=True, type=int, help="Seeds the LoRA init, data order, "
              "random data and preset weights.")
@click.option("--save-every", type=click.IntRange(min=1), help="Write a resumable OUTPUT/checkpoint-N/ every N steps.")
@click.option("--eval-data", help="Evaluation data (same kinds of file as --data).")
@click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Hold out this fraction of --data for evaluation.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate every N steps (and always at the end).")
@click.option("--on-nan", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="A step with a NaN/inf loss or gradient: stop (keeping the last good adapter) or skip it.")
@click.option("--merge", is_flag=True, help="At the end, also write the merged model to OUTPUT/merged.")
@click.option("--gguf", "gguf_method", help="At the end, also write a GGUF file to OUTPUT/gguf with this "
              "quantization method (f16, q8_0, ...).")
@click.option("--nproc", type=click.IntRange(min=1), help="Train on N processes of this machine, one GPU each (gloo "
              "processes on a machine without GPUs), launched through torch.distributed.run; at most the GPUs "
              "present. Each trains --batch rows of every micro-batch, so a step covers N x batch x grad-accum rows; "
              "the LoRA gradients are summed over the processes and the loss is the mean over all their label "
              "tokens. Rank 0 writes the files. --resume needs the N the checkpoint was written with. "
              "'torchrun --nproc_per_node N -m fastbench -- train ...' starts the same processes (--nproc may then be "
              "left out; the '--' keeps torchrun from taking --r or --nproc for its own options).")
@click.option("--trust-remote-code", is_flag=True, help="Let the checkpoint run its own Python code (off: never).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle-based weight files (.bin, .pt), which can run code.")
@click.pass_context
def train_command(ctx, model, data, data_format, text_field, chat_template, train_on_inputs, packing, output, resume,
                  overwrite, max_seq_length, load_in_4bit, rank, lora_alpha, targets, batch, grad_accum, lr, steps,
                  epochs, warmup_steps, checkpointing, offload_host_gib, seed, save_every, eval_data, eval_fraction,
                  eval_every, on_nan, merge, gguf_method, nproc, trust_remote_code, allow_pickle):
    """Fine-tune MODEL (a fastbench preset or a local checkpoint directory) with LoRA on the fused path."""
    from fastbench.memory import use_expandable_segments
    from fastbench.presets import NotAModel, UnknownPreset, resolve_model
    from fastbench.train.checkpoint import CheckpointError, load_checkpoint

    use_expandable_segments()  # before anything starts CUDA, unless the user chose allocator settings
    started = time.monotonic()
    if steps and epochs:
        raise click.UsageError("give --steps or --epochs, not both")
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    if eval_data and eval_fraction:
        raise click.UsageError("give --eval-data or --eval-fraction, not both")
    if eval_every and not (eval_data or eval_fraction):
        raise click.UsageError("--eval-every needs --eval-data or --eval-fraction")
    offloads = is_offload(checkpointing)
    if offload_host_gib is not None and not offloads:
        raise click.UsageError("--offload-host-gib applies to --checkpointing offload")
    target_modules = [t.strip() for t in targets.split(",") if t.strip()]
    if not target_modules:
        raise click.BadParameter("no module names", param_hint="--targets")
    try:
        source = resolve_model(model)
    except (UnknownPreset, NotAModel) as e:
        raise click.BadParameter(str(e), param_hint="MODEL") from None
    if data == "random":
        if not steps:
            raise click.UsageError("--data random is an endless stream: give --steps")
        if eval_data or eval_fraction:
            raise click.UsageError("--data random has nothing to evaluate on; drop --eval-data/--eval-fraction")
    torchrun = _torchrun_env()
    if torchrun and nproc and nproc != torchrun.world_size:
        raise click.BadParameter(f"{nproc}, and torchrun started {torchrun.world_size} processes: leave --nproc out "
                                 "under torchrun, or give the same number", param_hint="--nproc")
    world_size = torchrun.world_size if torchrun else nproc or 1
    ctx.params["nproc"] = world_size  # as the saved configuration records it
    if gguf_method:
        check_gguf(gguf_method, source, data)
    checkpoint_path = check_output(output, resume, overwrite)
    resume_state = None
    if checkpoint_path:
        from fastbench.distributed.world import World, WorldSizeMismatch, check_resume

        try:
            resume_state = load_checkpoint(checkpoint_path)
            check_resume(resume_state, World(world_size=world_size), checkpoint_path)
        except (CheckpointError, WorldSizeMismatch) as e:
            raise click.BadParameter(str(e), param_hint="--resume") from None
    launching = not torchrun and world_size > 1
    if launching:
        gpus = check_launch(world_size)
    if offloads and (offload_host_gib is not None or launching):  # each process's limit goes on its command line
        offload_host_gib = ctx.params["offload_host_gib"] = offload_host_limit(
            source, world_size, batch, max_seq_length, offload_host_gib, check_host=launching)
    if launching:
        _launch(ctx, world_size, gpus)

    with sigterm_as_interrupt(once=torchrun is not None) as stop, contextlib.ExitStack() as joined:
        world = None
        try:
            world = joined.enter_context(_joined_world())
            prepared = _prepare(source, data, data_format, text_field, chat_template, train_on_inputs, packing,
                                max_seq_length, batch, grad_accum, steps, epochs, seed, eval_data, eval_fraction,
                                trust_remote_code, world)
            if gguf_method and prepared.tokenizer is not None:
                check_gguf(gguf_method, source, data, prepared.tokenizer)
            if resume_state and resume_state["step"] >= prepared.steps:
                raise click.UsageError(f"{resume_state['path']} is at step {resume_state['step']}, which already "
                                       f"reaches --steps/--epochs ({prepared.steps} steps); raise them to train on")
            peft_model = load_model(source, max_seq_length, load_in_4bit, seed, rank, target_modules, lora_alpha,
                                    checkpointing, trust_remote_code, allow_pickle, say=world.is_main,
                                    offload_host_gib=offload_host_gib)
            if world.is_main:
                os.makedirs(output, exist_ok=True)
                save_effective_config(ctx, output)
        except KeyboardInterrupt:
            if world is None or world.is_main:
                click.echo(f"{'terminated (SIGTERM)' if stop.terminated else 'interrupted'} before training "
                           "started; nothing was trained", err=True)
            raise SystemExit(exit_code(stop)) from None
        _train(peft_model, prepared, output, overwrite, resume_state, lr, warmup_steps, save_every, eval_every,
               on_nan, stop, started, world)
        if not world.is_main:
            return
        try:
            _export(peft_model, prepared.tokenizer, output, merge, gguf_method)
        except KeyboardInterrupt:
            click.echo(f"{'terminated (SIGTERM)' if stop.terminated else 'interrupted'} while exporting; the adapter "
                       f"is saved in {output}", err=True)
            raise SystemExit(exit_code(stop)) from None


# --------------------------------------------------------------------------------------- several processes
def _torchrun_env():
    from fastbench.distributed.launch import DistributedSetupError, torchrun_env

    try:
        return torchrun_env()
    except DistributedSetupError as e:
        raise click.UsageError(str(e)) from None


@contextlib.contextmanager
def _joined_world():
    """The world of this process (a world of one without torchrun's variables), once every process of it
    has passed the checks before it: rank 0 writes into --output only after that."""
    from fastbench.distributed.launch import DistributedSetupError
    from fastbench.distributed.world import barrier, process_group

    try:
        with process_group() as world:
            barrier(world)
            yield world
    except DistributedSetupError as e:
        raise click.UsageError(str(e)) from None


def command_line(ctx: click.Context) -> list[str]:
    """This run's arguments (a --config file's values included) as a command line of the same command (which
    each launched process runs: it finds torchrun's variables, and --nproc equal to their world size)."""
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not param.expose_value or value is None:
            continue
        if isinstance(param, click.Argument):
            args.insert(0, str(value))
        elif param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args += [param.opts[0]] if value else []
        else:
            args += [param.opts[0], str(value)]
    return args


def is_offload(checkpointing) -> bool:
    from fastbench.fused.checkpointing import parse_setting

    return parse_setting(checkpointing)[0] == "offload"


def offload_host_limit(source, nproc, batch, max_seq_length, limit_gib=None, check_host=True) -> float:
    """--checkpointing offload: the most host memory (GiB) each of ``nproc`` processes' offloaded activations may
    hold: ``limit_gib`` (--offload-host-gib) where given, else each process's even share of the host's available
    memory. Refuses up front, with the numbers, where that cannot hold one layer input a layer (the least the
    offload mode keeps), or, with ``check_host`` (the process that launches the others; not the processes
    themselves, whose own memory already counts against the host), where the processes' limits exceed the
    host."""
    import torch

    from fastbench.distributed.host_memory import (GiB, HostMemoryShort, check_host_memory, embedding_table_bytes,
                                                   host_share_bytes, offload_host_bytes)

    config = source.config()
    tokens, dtype_bytes = batch * max_seq_length, 2 if torch.cuda.is_available() else 4
    hint = "--nproc" if limit_gib is None else "--offload-host-gib"
    try:
        if limit_gib is None:
            return math.floor(host_share_bytes(config, tokens, nproc, dtype_bytes) / GiB * 100) / 100  # rounded down
        least = offload_host_bytes(config, tokens, dtype_bytes, whole_layers=True)
        table = embedding_table_bytes(config, dtype_bytes)
        if limit_gib * GiB < least - table:
            raise HostMemoryShort(f"{limit_gib:g} GiB cannot hold a forward of --batch x --max-seq-length = {tokens} "
                                  f"tokens: it needs at least {(least - table) / GiB:.2f} GiB (one layer input a "
                                  "layer); raise it, or lower --batch or --max-seq-length")
        if check_host:
            check_host_memory(int(limit_gib * GiB) + table, nproc)
        return limit_gib
    except HostMemoryShort as e:
        raise click.BadParameter(str(e), param_hint=hint) from None


def check_launch(nproc) -> int:
    """Refuses --nproc where this machine cannot run that many processes; returns its GPU count."""
    import torch

    from fastbench.distributed.launch import DistributedSetupError, check_nproc

    gpus = torch.cuda.device_count()
    try:
        check_nproc(nproc, gpus)
    except DistributedSetupError as e:
        raise click.BadParameter(str(e).removeprefix(f"--nproc {nproc}: "), param_hint="--nproc") from None
    return gpus


def _launch(ctx, nproc, gpus):
    """Runs this command as ``nproc`` processes of one world (torch.distributed.run) and exits with the job's
    exit code: 0, 130/143 when stopped by a signal, or the exit code of the process that failed first."""
    from fastbench.distributed.launch import ProcessFailed, launch

    click.echo(f"launching {nproc} processes ({'one GPU each, NCCL' if gpus else 'gloo, CPU'})", err=True)
    try:
        code = launch([ctx.info_name, *command_line(ctx)], nproc, gpus=gpus)
    except ProcessFailed as e:
        click.echo(f"fastbench train: {e}", err=True)
        raise SystemExit(e.exitcode if e.exitcode > 0 else 1) from None
    except KeyboardInterrupt:  # before the processes started
        raise SystemExit(130) from None
    raise SystemExit(code)


class _Prepared:
    """What the data side hands the loop: tokenizer, plan, evaluation batches, step count."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _prepare(source, data, data_format, text_field, chat_template, train_on_inputs, packing, max_seq_length,
             batch, grad_accum, steps, epochs, seed, eval_data, eval_fraction, trust_remote_code, world):
    from fastbench.train.loop import ExamplePlan, RandomPlan, eval_batches

    share = (world.rank, world.world_size)
    if data == "random":
        return _Prepared(tokenizer=None, plan=RandomPlan(source.vocab_size, max_seq_length, batch, grad_accum, seed,
                                                         *share), evaluation=None, steps=steps)
    tokenizer = load_tokenizer(source, chat_template, trust_remote_code)
    examples, fmt, truncated = load_examples(data, tokenizer, data_format, text_field, train_on_inputs,
                                             max_seq_length)
    evaluation_examples = None
    if eval_data:
        evaluation_examples, _, eval_truncated = load_examples(eval_data, tokenizer, data_format or fmt, text_field,
                                                               train_on_inputs, max_seq_length, "--eval-data")
        truncated += eval_truncated
    elif eval_fraction:
        examples, evaluation_examples = split_eval(examples, eval_fraction, seed)
    top = max(max(e["input_ids"]) for e in examples + (evaluation_examples or []))
    if top >= source.vocab_size:
        raise click.ClickException(f"the tokenizer of {source.name} makes ids beyond its vocab_size "
                                   f"{source.vocab_size}")
    pad_id = tokenizer.pad_token_id
    plan = ExamplePlan(examples, batch, grad_accum, max_seq_length, packing, pad_id, seed, *share)
    steps = steps or plan.steps_in(epochs or 1)
    rows = sum(len(micro) for step in plan.epoch(0) for micro in step)
    if world.is_main:
        processes = f"{world.world_size} processes x " if world.world_size > 1 else ""
        click.echo(f"{len(examples)} {fmt} examples"
                   + (f" ({truncated} longer than --max-seq-length {max_seq_length}, truncated)" if truncated else "")
                   + (f", packed into {rows} rows" if packing else "")
                   + f"; {steps} steps of {processes}{batch} x {grad_accum}"
                   + (f"; {len(evaluation_examples)} eval examples" if evaluation_examples else ""), err=True)
    evaluation = eval_batches(evaluation_examples, batch, max_seq_length, packing, pad_id, *share) \
        if evaluation_examples else None
    return _Prepared(tokenizer=tokenizer, plan=plan, evaluation=evaluation, steps=steps)


def _train(peft_model, prepared, output, overwrite, resume_state, lr, warmup_steps, save_every, eval_every, on_nan,
           stop, started, world):
    """Trains ``peft_model`` (under DDP in a world of several processes) and saves the adapter; on every kind
    of stop the adapter of the finished steps is kept. Rank 0 alone writes; the others wait for it."""
    from tqdm.auto import tqdm

    from fastbench.distributed import ddp
    from fastbench.distributed.world import barrier, peer_lost
    from fastbench.fused.checkpointing.offload import PinnedMemoryShort
    from fastbench.files import out_of_disk_space
    from fastbench.memory import is_out_of_memory
    from fastbench.train.checkpoint import CheckpointError, save_adapter
    from fastbench.train.loop import LoopSettings, LoopState, NonFiniteLoss, keep_log_until, plot_loss, train_loop

    tokenizer, main, several = prepared.tokenizer, world.is_main, world.world_size > 1
    settings = LoopSettings(output=output, steps=prepared.steps, lr=lr, warmup_steps=warmup_steps,
                            save_every=save_every, eval_every=eval_every, on_nan=on_nan)
    state = LoopState()
    bar = tqdm(total=prepared.steps, initial=resume_state["step"] if resume_state else 0, desc="train",
               unit="step", dynamic_ncols=True, disable=not main)
    who = f"process {world.rank}: " if several else ""

    def save() -> bool:
        """Rank 0: the adapter and the plot (a signal meanwhile is held until they are written). False when the
        disk is full: the adapter files in ``output`` are then as they were (loss.png is drawn only with room)."""
        if main:
            with stop.held():
                try:
                    save_adapter(peft_model, tokenizer, output)
                except Exception as e:
                    if not out_of_disk_space(e):
                        raise
                    return False
                try:
                    plot_loss(output)
                except Exception as e:
                    if not out_of_disk_space(e):
                        raise
        return True

    def keep(note):
        bar.close()
        if not state.done:
            kept = "no step finished"
        elif save():
            kept = f"the adapter of the {state.done} finished steps is saved to {output}"
        else:
            kept = f"the disk is full, so the adapter of the {state.done} finished steps could not be saved either"
        return f"{note}; {kept}" if main else note

    def stopped():
        bar.close()
        if main:
            save()
            click.echo(f"{'terminated (SIGTERM)' if stop.terminated else 'interrupted'} after step {state.done}: "
                       f"adapter saved to {output}", err=True)
        raise SystemExit(exit_code(stop))

    try:
        if main:
            if overwrite:
                clear_previous_run(output)
            keep_log_until(output, resume_state["step"] if resume_state else 0)
        model = ddp.wrap(peft_model, world)
        train_loop(model, prepared.plan, settings, state, prepared.evaluation, resume_state, bar, world)
        bar.close()
        saved = save()
    except KeyboardInterrupt:
        stopped()
    except CheckpointError as e:  # the same on every rank: rank 0 says it
        bar.close()
        if not main:
            raise SystemExit(2) from None
        raise click.BadParameter(str(e), param_hint="--resume") from None
    except NonFiniteLoss as e:  # the same on every rank (the loss and the gradients are the world's)
        if not main:
            raise SystemExit(1) from None
        last = f"; the last checkpoint, {state.last_checkpoint}, is kept" if state.last_checkpoint else ""
        raise click.ClickException(keep(
            f"step {e.step}: the loss is {e.loss} and the gradient norm {e.grad_norm}, not finite; stopped{last}. "
            "Likely a learning rate too high for this model (lower --lr or raise --warmup-steps), float16 overflow, "
            "or a broken example in this step; --on-nan skip skips such steps")) from None
    except Exception as e:  # the optimizer has not stepped on a failed step: the finished ones are kept
        if is_out_of_memory(e):
            raise click.ClickException(who + keep(
                f"out of GPU memory in step {state.done + 1}") + ". Lower --batch (raise --grad-accum to keep the "
                "step size) or --max-seq-length, or use --checkpointing offload or --load-in-4bit") from None
        if isinstance(e, PinnedMemoryShort):  # the offload mode's host buffers
            raise click.ClickException(who + keep(f"out of host memory in step {state.done + 1}") + f". {e.shortage}. "
                                       "Lower --batch (raise --grad-accum to keep the step size) or --max-seq-length, "
                                       "or use --checkpointing with a budget in GiB (it offloads only what does not "
                                       "fit the GPU) or true (nothing in host memory)") from None
        if several and stop.stopped:  # a collective cut short by the signal that stops every process
            stopped()
        if several and peer_lost(e):  # another process ended: the launcher's SIGTERM follows
            if _await_launcher(stop):
                stopped()
            click.echo(who + keep(f"another process failed in step {state.done + 1} (its message is above)"),
                       err=True)
            raise SystemExit(1) from None
        if out_of_disk_space(e):  # writing a checkpoint or the log: nothing half-written is left
            last = f", the last checkpoint, {state.last_checkpoint}, is kept" if state.last_checkpoint else ""
            then = "train on with --resume" if state.last_checkpoint else "train again with --overwrite"
            raise click.ClickException(who + keep(
                f"no space left on device writing to {output} after step {state.done} (nothing half-written is left"
                f"{last})") + f"; free some space, then {then}") from None
        click.echo(who + keep(f"failed in step {state.done + 1}"), err=True)
        raise
    if not saved:
        last = f"; the last checkpoint, {state.last_checkpoint}, holds the adapter of its step" \
            if state.last_checkpoint else ""
        raise click.ClickException(f"no space left on device to save the adapter of the {state.done} finished steps "
                                   f"to {output}; the adapter files there are as they were{last}. Free some space and train "
                                   "again")
    barrier(world)
    if main:
        click.echo(summary_line(state, output, started, world.world_size), err=True)


def _await_launcher(stop, timeout_s: float = 60.0) -> bool:
    """Waits for the signal that stops this process after another one ended (the launcher's SIGTERM after a
    failure, or the user's signal that reached it first), so that the launcher names the process that ended
    first; whether the signal came."""
    deadline = time.monotonic() + timeout_s
    try:
        while not stop.stopped and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    return stop.stopped


def _export(peft_model, tokenizer, output, merge, gguf_method):
    """--merge / --gguf: through the model's own export methods, after the adapter is saved. Each replaces the
    one an earlier run left in ``output`` once it is complete; a disk without room, or a model llama.cpp cannot
    take, is said in one line (exit 1), nothing half-written left."""
    from fastbench.export.files import NotEnoughSpace
    from fastbench.files import out_of_disk_space

    try:
        if merge:
            path = peft_model.save_pretrained_merged(os.path.join(output, "merged"), tokenizer, overwrite=True)
            click.echo(f"merged model saved to {path}", err=True)
        if gguf_method:
            path = peft_model.save_pretrained_gguf(os.path.join(output, "gguf"), tokenizer,
                                                   quantization_method=gguf_method, overwrite=True)
            click.echo(f"GGUF saved to {path}", err=True)
    except Exception as e:
        if isinstance(e, NotEnoughSpace) or out_of_disk_space(e):
            said = str(e) if isinstance(e, NotEnoughSpace) else f"no space left on device while exporting ({e})"
            raise click.ClickException(f"{said}; nothing half-written is left, and the adapter is saved in {output}: "
                                       f"free some space, then export it with fastbench export {output}") from None
        if isinstance(e, ValueError):  # found late: what llama.cpp cannot take of this model
            raise click.ClickException(f"{e} (the adapter is saved in {output})") from None
        raise
