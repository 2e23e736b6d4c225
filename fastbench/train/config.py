"""``--config FILE``: options from a .yaml, .toml or .json file, one key per option (``max_seq_length``,
``grad_accum``, ``r``, ``packing``, ``model``, ...). Values given on the command line override the file's.
The effective configuration of a run is saved beside its outputs as ``train_config.json``, a file
``--config`` takes back.
"""
from __future__ import annotations

import json
import os

import click

SAVED_NAME = "train_config.json"
NOT_IN_FILES = ("config", "help")


def option_keys(command: click.Command) -> dict[str, str]:
    """Config key -> parameter name: each option's long name with '-' as '_' (``--grad-accum`` ->
    ``grad_accum``, ``--packing/--no-packing`` -> ``packing``), and arguments by name."""
    keys = {}
    for param in command.params:
        if param.name in NOT_IN_FILES:
            continue
        if isinstance(param, click.Argument):
            keys[param.name] = param.name
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        keys[(longs[0] if longs else param.opts[0]).lstrip("-").replace("-", "_")] = param.name
    return keys


def read_config(path: str) -> dict:
    """The mapping in a .yaml/.yml, .toml or .json file; click.BadParameter saying what is wrong."""
    def bad(message):
        return click.BadParameter(f"{path}: {message}", param_hint="--config")

    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise bad("reading .yaml needs PyYAML (pip install pyyaml)") from None
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise bad("reading .toml needs Python 3.11 or later; use .yaml or .json") from None
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise bad("expected a .yaml, .toml or .json file")
    except click.BadParameter:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, json's ValueError
        raise bad(f"cannot parse it ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise bad("must hold a mapping of option names to values")
    return data


def apply_config(ctx: click.Context, param, path):
    """Eager callback of ``--config``: the file's values become the command's defaults (so the command line
    overrides them); a key that is no option is refused, naming it."""
    if not path or ctx.resilient_parsing:
        return path
    keys = option_keys(ctx.command)
    defaults = {}
    for key, value in read_config(path).items():
        name = keys.get(str(key).replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"{path}: {key!r} is not an option of train (options: "
                                     f"{', '.join(sorted(keys))})", param_hint="--config")
        if isinstance(value, (list, tuple)):  # e.g. targets: [q_proj, v_proj]
            value = ",".join(map(str, value))
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def effective_config(ctx: click.Context) -> dict:
    """The run's options as config keys -> values (what ``--config`` reads back)."""
    names = {name: key for key, name in option_keys(ctx.command).items()}
    return {names[name]: value for name, value in ctx.params.items() if name in names}


def save_effective_config(ctx: click.Context, output: str) -> str:
    from fastbench.files import atomic_path

    path = os.path.join(output, SAVED_NAME)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(effective_config(ctx), f, indent=2, default=str)
        f.write("\n")
    return path
