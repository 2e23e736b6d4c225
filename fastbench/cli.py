"""The ``fastbench`` command line: one click group; each command lives with the code it drives and is
imported only when it runs (so ``fastbench --help`` stays fast and imports no torch)."""
from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> "module:attribute" of its click.Command
COMMANDS = {
    "env": "fastbench.env:env_command",
    "compare": "fastbench.bench.cli:compare",
    "tune": "fastbench.autotune.cli:tune",
    "train": "fastbench.train.cli:train_command",
    "export": "fastbench.export.cli:export_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._module_exists(name))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or not self._module_exists(name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    @staticmethod
    def _module_exists(name):
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastbench")
def main():
    """fastbench: LoRA/QLoRA fine-tuning with per-GPU autotuned Triton kernels, and the harness
    that measures it against PEFT, QLoRA and the peers.

    \b
    fastbench env       what this machine has (GPU, driver, CUDA, libraries, autotune cache)
    fastbench compare   controlled speed/VRAM comparisons, reports and regression checks
    fastbench tune      tune the kernels for this GPU and cache the winners
    fastbench train     fine-tune a model with the fused path
    fastbench export    an adapter or merged model as GGUF (q4_k_m, ...) or a merged checkpoint
    """
if __name__ == "__main__":
    main()
