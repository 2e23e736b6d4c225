"""``fastbench export``: an adapter (merged onto its base first) or a merged checkpoint to GGUF files
and/or a merged checkpoint."""
from __future__ import annotations

import json
import os

import click

from fastbench.export.schemes import SCHEMES
from fastbench.files import out_of_disk_space
from fastbench.interrupt import exit_code, sigterm_as_interrupt


def _methods(ctx, param, values):
    methods = [m.strip().lower() for v in values for m in v.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SCHEMES]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r}; valid: {', '.join(SCHEMES)}")
    return list(dict.fromkeys(methods))


@click.command("export")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--gguf", "methods", multiple=True, callback=_methods, metavar="METHOD[,METHOD...]",
              help=f"GGUF file(s) to write, one per method: {', '.join(SCHEMES)}.")
@click.option("--output", type=click.Path(file_okay=False), help="Directory of the GGUF files "
              "[default: SOURCE-gguf].")
@click.option("--merged", "merged_dir", type=click.Path(file_okay=False),
              help="Also write the merged model here as a transformers checkpoint (16-bit, --dtype).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="The merged checkpoint's dtype, and the base's when loaded.")
@click.option("--load-in-4bit", is_flag=True, help="Load the adapter's base as NF4, as QLoRA trained it: the "
              "adapter is merged onto the dequantized NF4 weights it was trained with.")
@click.option("--base", help="The adapter's base (a checkpoint or a preset name), where adapter_config.json "
              "names none or another place.")
@click.option("--seed", default=3407, show_default=True, type=int,
              help="For a preset base (random weights): the seed it was built with (fastbench train's --seed).")
@click.option("--overwrite", is_flag=True, help="Write into output directories that are not empty.")
def export_command(source, methods, output, merged_dir, dtype, load_in_4bit, base, seed, overwrite):
    """Export SOURCE, an adapter directory (fastbench train's output: merged onto the base its
    adapter_config.json names) or a merged checkpoint, as GGUF files for llama.cpp (k-quants
    included, no llama.cpp needed) and/or a merged checkpoint.

    \b
    fastbench export out/adapter --gguf q4_k_m
    fastbench export out/adapter --gguf q4_k_m,q8_0 --output out/gguf --merged out/merged
    """
    from fastbench.export.files import check_target_directory

    if not methods and not merged_dir:
        raise click.UsageError("nothing to write: give --gguf METHOD and/or --merged DIR")
    output = output or source.rstrip("/") + "-gguf"
    try:
        for directory in ([output] if methods else []) + ([merged_dir] if merged_dir else []):
            check_target_directory(directory, overwrite)
    except ValueError as e:
        raise click.UsageError(str(e).replace("overwrite=True (--overwrite on the command line)", "--overwrite"))
    with sigterm_as_interrupt() as stop:
        try:
            _export(source, methods, output, merged_dir, dtype, load_in_4bit, base, seed, overwrite)
        except KeyboardInterrupt:  # every file is written under a temporary name, removed on the way out
            click.echo(f"{'terminated (SIGTERM)' if stop.terminated else 'interrupted'} while exporting; no "
                       "half-written file is left (the files named above are complete)", err=True)
            raise SystemExit(exit_code(stop)) from None


def _export(source, methods, output, merged_dir, dtype, load_in_4bit, base, seed, overwrite):
    import torch

    model, tokenizer = _load(source, getattr(torch, dtype), load_in_4bit, base, seed)
    if methods and tokenizer is None:
        raise click.UsageError(f"{source} and its base have no tokenizer, and a GGUF needs one: save the tokenizer "
                               "beside the adapter (tokenizer.save_pretrained)")
    try:
        if merged_dir:
            from fastbench.export.merge import save_pretrained_merged

            save_pretrained_merged(model, merged_dir, tokenizer, dtype=getattr(torch, dtype), overwrite=overwrite)
            click.echo(f"merged checkpoint: {merged_dir}")
        if methods:
            from fastbench.export.gguf_file import save_pretrained_gguf

            for path in save_pretrained_gguf(model, output, tokenizer, methods, overwrite=True):
                click.echo(f"gguf: {path} ({os.path.getsize(path) / 2**30:.2f} GiB)")
    except ValueError as e:  # bad input found late: the tokenizer, the architecture, the disk
        raise click.UsageError(str(e)) from None
    except Exception as e:  # the disk filled while writing despite the check before: name it, no traceback
        if not out_of_disk_space(e):
            raise
        raise click.ClickException(f"no space left on device while exporting ({e}); what was being written was "
                                   "removed, the files named above are complete: free some space and run it "
                                   "again") from None



def _check_adapter(source: str) -> dict:
    """The adapter_config.json of the adapter directory ``source``, once it and the adapter's weights file read
    whole (the safetensors header, and the file covering every tensor it lists); one line naming the damaged
    file otherwise, before the base loads."""
    from safetensors import safe_open

    def damaged(name, error):
        return click.BadParameter(f"{os.path.join(source, name)} is damaged ({error}); export from an intact copy of "
                                  "the adapter (a checkpoint-N/ of its training run holds one) or train it again",
                                  param_hint="SOURCE")

    try:
        with open(os.path.join(source, "adapter_config.json")) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise damaged("adapter_config.json", e) from None
    weights = os.path.join(source, "adapter_model.safetensors")
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(source, "adapter_model.bin")):
            return config
        raise click.BadParameter(f"{source} has adapter_config.json but no adapter_model.safetensors; copy the "
                                 "adapter's weights beside it", param_hint="SOURCE")
    try:
        with safe_open(weights, framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors' own error for a short or garbled file
        raise damaged("adapter_model.safetensors", e) from None
    return config


def _load(source: str, dtype, load_in_4bit: bool, base_name: str | None, seed: int):
    """(model, tokenizer) of an adapter directory (base + adapter, unmerged) or a checkpoint."""
    import warnings

    import torch

    from fastbench.model import FastLanguageModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_config = os.path.join(source, "adapter_config.json")
    if not os.path.exists(adapter_config):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise click.BadParameter(f"{source} has neither adapter_config.json (an adapter) nor config.json (a "
                                     "checkpoint)", param_hint="SOURCE")
        return FastLanguageModel.from_pretrained(source, dtype=dtype, device=device, load_in_4bit=load_in_4bit)
    from peft import PeftModel

    config = _check_adapter(source)
    base_name = base_name or config.get("base_model_name_or_path")
    if not base_name:
        raise click.UsageError(f"{adapter_config} names no base model (base_model_name_or_path): give --base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a preset's "random weights, no tokenizer"
        try:
            base, tokenizer = FastLanguageModel.from_pretrained(base_name, dtype=dtype, device=device,
                                                                load_in_4bit=load_in_4bit, seed=seed)
        except OSError as e:
            raise click.BadParameter(f"cannot load the adapter's base {base_name!r}: {e}", param_hint="SOURCE")
    if any(os.path.exists(os.path.join(source, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    return PeftModel.from_pretrained(base, source), tokenizer
