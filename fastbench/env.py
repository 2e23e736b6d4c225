"""``fastbench env``: what this machine has (GPU, driver, CUDA, library versions, git SHA, the autotune
cache state). ``collect_environment()`` is also what every results file records."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess

import click

LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "fastbench",
             "liger_kernel", "unsloth", "trl")


def _version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML library or no driver
        return None


def host_topology(gpu_index: int | None = None) -> dict:
    """Where this process may run against where its GPU sits: the host's NUMA nodes, the GPU's node (from its
    PCI address), how many CPUs the process may use and how many of those are on the GPU's node; and the GPU's
    PCIe link (generation and width, now and at most), which bounds the offload mode's copies. ``gpu_index``:
    NVML's index of the GPU (None: no GPU). A value the host does not give (not Linux, no NVML) stays None."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    def cpus_in(cpulist):  # "0-7,16-23" -> {0, ..., 7, 16, ..., 23}
        cpus = set()
        for part in filter(None, (cpulist or "").split(",")):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        return cpus

    root = "/sys/devices/system/node"
    nodes = [n for n in os.listdir(root) if n[4:].isdigit()] if os.path.isdir(root) else []
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    out = {"numa_nodes": len(nodes) or None, "cpus_allowed": None if allowed is None else len(allowed),
           "gpu_numa_node": None, "cpus_allowed_on_gpu_node": None, "pcie": None}
    if gpu_index is None:
        return out
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
        out["pcie"] = {"gen": pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                       "width": pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
                       "max_gen": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                       "max_width": pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)}
    except Exception:  # no NVML library, driver or GPU
        return out
    domain, _, rest = (bus.decode() if isinstance(bus, bytes) else bus).partition(":")  # "00000000:1B:00.0"
    node = read(f"/sys/bus/pci/devices/{int(domain, 16):04x}:{rest.lower()}/numa_node")
    if node is not None and node.isdigit():  # -1: the host does not say
        out["gpu_numa_node"] = int(node)
        local = cpus_in(read(f"{root}/node{node}/cpulist"))
        out["cpus_allowed_on_gpu_node"] = None if allowed is None else len(local & allowed)
    return out


def _autotune_state() -> dict:
    from fastbench.autotune.lookup import describe

    return describe()


# What fastbench changes outside its own code: nothing at import; on the model objects that
# FastLanguageModel.get_peft_model returns (and only those), fastbench/fused/causal_lm.py's install().
PATCHES = ("importing fastbench patches nothing; on each model returned by FastLanguageModel.get_peft_model, "
           "that instance's causal-LM forward and decoder-stack forward are replaced by the fused path "
           "(and, with use_gradient_checkpointing='offload', its input embedding's forward, the table then "
           "in pinned host memory); other instances and the transformers classes are untouched; the list of "
           "what was replaced is on model.base_model.model.fastbench_patches")


def collect_environment() -> dict:
    import torch

    named_sha = os.environ.get("FASTBENCH_GIT_SHA")
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "cuda": torch.version.cuda, "gpu": None, "gpu_count": 0,
           "compute_capability": None, "gpu_memory_gib": None, "driver": _driver(),
           "versions": {lib: _version(lib) for lib in LIBRARIES},
           # FASTBENCH_GIT_SHA, when set, names the commit a copied tree holds (its .git may be absent or stale)
           "git_sha": named_sha or _git("rev-parse", "HEAD")}
    status = None if named_sha else _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    env["host"] = host_topology(0 if torch.cuda.is_available() else None)
    env["autotune"] = _autotune_state()
    env["patches"] = PATCHES
    env["switches"] = switches()
    return env


# Environment variables that change what fastbench trains or measures (not where it keeps files): a run records
# the ones set, so that a result made with one of them reads as such.
SWITCHES = ("FASTBENCH_AUTOTUNE", "FASTBENCH_PIN", "FASTBENCH_COMPILED_CACHE", "FASTBENCH_BENCH_FLUSH",
            "FASTBENCH_SIMULATE_OOM")


def switches() -> dict[str, str]:
    """The :data:`SWITCHES` set in this process's environment (empty: every default)."""
    return {name: os.environ[name] for name in SWITCHES if name in os.environ}


def format_environment(env: dict) -> str:
    gpu = (f"{env['gpu']} x{env['gpu_count']} (sm {env['compute_capability']}, {env['gpu_memory_gib']} GiB)"
           if env["gpu"] else "none (CPU only)")
    sha = env["git_sha"] or "not a git checkout"
    if env["git_sha"] and env["git_dirty"]:
        sha += " (uncommitted changes)"
    lines = [f"GPU:       {gpu}", f"driver:    {env['driver'] or 'n/a'}", f"CUDA:      {env['cuda'] or 'n/a'}",
             f"python:    {env['python']} on {env['platform']}", f"git:       {sha}", "libraries:"]
    lines += [f"  {lib:<13} {v or 'not installed'}" for lib, v in env["versions"].items()]
    tune = env["autotune"]
    lines.append(f"autotune cache: {tune['cache_dir']}; this GPU's file "
                 f"{tune['user_file'] or 'n/a (no GPU)'}{'' if tune['user_file_exists'] else ' (absent)'}")
    for bundled in tune["bundled"]:
        entries = sum(bundled.get("entries", {}).values())
        lines.append(f"  bundled {bundled['file'].rsplit('/', 1)[-1]}: {entries} entries"
                     f"{'' if bundled.get('valid') else ' (invalid)'}")
    if tune.get("compiled_cache"):
        from fastbench.autotune.compiled_cache import summary

        lines.append(f"  {summary(tune['compiled_cache'])}")
    lines.append("  `fastbench tune --list` shows which tier serves each op")
    lines.append(f"patches:   {env['patches']}")
    lines.append(f"switches:  {format_switches(env.get('switches'))}")
    lines.append(f"host:      {format_host(env.get('host'))}")
    return "\n".join(lines)


def format_host(host: dict | None) -> str:
    """One line of :func:`host_topology`'s record."""
    if host is None:
        return "not recorded"
    parts = [f"{host['numa_nodes'] or '?'} NUMA node(s)"]
    if host["gpu_numa_node"] is not None:
        parts.append(f"GPU on node {host['gpu_numa_node']}")
    if host["cpus_allowed"] is not None:
        local = host["cpus_allowed_on_gpu_node"]
        on_node = f" ({local} on the GPU's node)" if local is not None else ""
        parts.append(f"{host['cpus_allowed']} CPUs allowed{on_node}")
    if host["pcie"]:
        pcie = host["pcie"]
        parts.append(f"PCIe gen {pcie['gen']} x{pcie['width']} (at most gen {pcie['max_gen']} x{pcie['max_width']})")
    return ", ".join(parts)


def format_switches(switches: dict | None) -> str:
    if switches is None:
        return "not recorded"
    return ", ".join(f"{k}={v}" for k, v in switches.items()) or "none set (every default)"


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print the environment as JSON.")
def env_command(as_json: bool):
    """Show the GPU, driver, CUDA, library versions, git SHA, the autotune cache state, what the fused path
    patches, the behaviour switches set, and the host's NUMA nodes and the GPU's PCIe link."""
    env = collect_environment()
    click.echo(json.dumps(env, indent=2, default=str) if as_json else format_environment(env))
