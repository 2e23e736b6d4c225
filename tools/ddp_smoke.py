"""Data-parallel smoke run on this machine's GPUs: a preset (default llama-3-8b, NF4, the fused path) trained
for a few steps on random tokens by a world of N processes (NCCL, one GPU each; N=1 is a DDP world of one),
reporting tokens/s of the whole job and per GPU, written to a JSON that records the world size.

    python tools/ddp_smoke.py                      # all GPUs
    python tools/ddp_smoke.py --nproc 2 --scaling  # one GPU, then two, in one run: the scaling
    torchrun --nproc_per_node 2 tools/ddp_smoke.py # the same world, started by hand

Each rank trains ``--batch`` rows of ``--seq`` tokens per micro-batch (the global micro-batch has N x batch
rows); the timed steps follow ``--warmup`` untimed ones.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, help="processes (GPUs); default: all GPUs")
    p.add_argument("--scaling", action="store_true", help="run a world of 1 first, then of --nproc, and report the ratio")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--bf16", action="store_true", help="a bf16 base instead of NF4")
    p.add_argument("--checkpointing", default="offload", help="true, false, offload, auto or a budget in GiB")
    p.add_argument("--batch", type=int, default=1, help="rows per rank per micro-batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="results/ddp_smoke.json")
    return p.parse_args(argv)


def train_rank(args) -> dict | None:
    """One rank of the world torchrun started (a world of one without torchrun): returns the measurement on
    rank 0, None elsewhere. The steps are the trainer's (fastbench.train.loop: RandomPlan's rows, accumulate's
    loss normalised over the world); on a CPU (gloo) memory is not measured."""
    import itertools

    import torch
    import torch.distributed as dist

    from fastbench import FastLanguageModel
    from fastbench.distributed import ddp
    from fastbench.distributed.host_memory import check_host_memory, offload_host_bytes
    from fastbench.distributed.world import barrier, process_group
    from fastbench.fused.checkpointing import setting_from_text
    from fastbench.presets import build_config
    from fastbench.train.loop import RandomPlan, accumulate

    with process_group() as world:
        cuda = world.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        setting = setting_from_text(args.checkpointing)
        config = build_config(args.preset)
        if setting in ("offload", "unsloth"):  # every rank, before any loads: they all see the same host
            pinned = offload_host_bytes(config, args.batch * args.seq)
            check_host_memory(pinned, int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size)))
        base, _ = FastLanguageModel.from_pretrained(args.preset, max_seq_length=args.seq, load_in_4bit=not args.bf16,
                                                    device=world.device, seed=0)
        model = FastLanguageModel.get_peft_model(base, r=args.rank, lora_alpha=args.rank, random_state=0,
                                                 use_gradient_checkpointing=setting, fallback=False)
        model = ddp.wrap(model, world)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        plan = RandomPlan(config.vocab_size, args.seq, args.batch, args.grad_accum, 0, world.rank, world.world_size)
        losses, times, tokens = [], [], 0
        for i, (_, micro_batches) in enumerate(itertools.islice(plan.stream({"epoch": 0, "step": 0}),
                                                                 args.warmup + args.steps)):
            if i == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            barrier(world)
            start = time.perf_counter()
            loss, step_tokens = accumulate(model, micro_batches, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            barrier(world)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                tokens += step_tokens
            losses.append(round(loss, 4))
        peak = None
        if cuda:
            peak = torch.tensor(torch.cuda.max_memory_reserved(world.device) / GiB, device=world.device)
            if world.grouped:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            peak = round(float(peak), 2)
        if not world.is_main:
            return None
        seconds = sum(times)
        return {"world_size": world.world_size, "preset": args.preset, "base": "bf16" if args.bf16 else "nf4",
                "checkpointing": args.checkpointing, "batch_per_rank": args.batch, "seq": args.seq,
                "grad_accum": args.grad_accum, "timed_steps": args.steps, "warmup_steps": args.warmup,
                "tokens_per_s": round(tokens / seconds, 1),
                "tokens_per_s_per_gpu": round(tokens / seconds / world.world_size, 1),
                "step_s": [round(t, 4) for t in times], "losses": losses, "peak_reserved_gib_max_rank": peak,
                "gpu": torch.cuda.get_device_name(world.device) if cuda else "cpu", "torch": torch.__version__}


def write_json(path, doc):
    from fastbench.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def run_world(args, nproc, out) -> dict:
    """Starts ``nproc`` ranks of this script under torchrun, writing their measurement to ``out``."""
    argv = [a for a in sys.argv[1:] if a != "--scaling"]
    argv = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or a.startswith("--out")
                                                  or (i and argv[i - 1] in ("--nproc", "--out")))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), *argv, "--out", out]
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"the world of {nproc} failed")
    with open(out) as f:
        return json.load(f)


def main():
    args = parse()
    from fastbench.distributed.launch import DistributedSetupError, check_nproc, torchrun_env

    if torchrun_env() is not None:
        result = train_rank(args)
        if result is not None:
            write_json(args.out, result)
            print(f"world {result['world_size']}: {result['tokens_per_s']:,.0f} tokens/s, "
                  f"{result['tokens_per_s_per_gpu']:,.0f} per GPU; peak reserved {result['peak_reserved_gib_max_rank']} "
                  f"GiB; losses {result['losses']}", flush=True)
        return
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("ddp_smoke needs a CUDA GPU")
    nproc = args.nproc or gpus
    try:
        check_nproc(nproc, gpus)
    except DistributedSetupError as e:
        raise SystemExit(str(e))
    with tempfile.TemporaryDirectory() as scratch:
        worlds = [1, nproc] if args.scaling and nproc > 1 else [nproc]
        runs = [run_world(args, n, os.path.join(scratch, f"world{n}.json")) for n in worlds]
    doc = runs[-1] if len(runs) == 1 else {"world_size": nproc, "runs": runs,
                                           "scaling": round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 3)}
    write_json(args.out, doc)
    if len(runs) > 1:
        print(f"scaling {nproc} GPUs / 1: {doc['scaling']:.2f}x ({doc['scaling'] / nproc:.0%} of linear)")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
