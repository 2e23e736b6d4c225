"""Where a fused step's wall time goes when the GPU idles: CPU issue time vs GPU time, synchronising
calls (torch.cuda.set_sync_debug_mode) and a cProfile of one step. Probe, not product code."""
import cProfile, collections, io, pstats, sys, time, traceback, warnings
import torch
from fastbench import FastLanguageModel

def build(bits, ckpt):
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b", dtype=torch.bfloat16, device="cuda", load_in_4bit=bits, seed=1)
    return FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt, fallback=False)

def step(m, opt, ids):
    t0 = time.perf_counter(); loss = m(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter(); loss.backward()
    t2 = time.perf_counter(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss, (t1 - t0, t2 - t1, time.perf_counter() - t2)

for arg in sys.argv[1:]:
    bits, ckpt = arg.split(":")
    bits = bits == "4bit"; ckpt = True if ckpt == "true" else ckpt if ckpt in ("offload", "auto") else float(ckpt)
    m = build(bits, ckpt)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
    ids = torch.randint(0, 128256, (2, 2048), device="cuda")
    print(arg, "lora dtype", next(p for p in m.parameters() if p.requires_grad).dtype, flush=True)
    for _ in range(3): step(m, opt, ids)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cpu = []; s.record()
    for _ in range(5): cpu.append(step(m, opt, ids)[1])
    e.record(); t = time.perf_counter(); torch.cuda.synchronize(); drain = time.perf_counter() - t
    fwd, bwd, o = (sum(c[i] for c in cpu) / 5 * 1e3 for i in range(3))
    print(f"{arg}: wall {s.elapsed_time(e)/5:.1f} ms/step; CPU issue fwd {fwd:.1f} bwd {bwd:.1f} opt {o:.1f} ms; drain after 5 steps {drain*1e3:.1f} ms", flush=True)
    sites = collections.Counter()
    def show(msg, cat, fn, ln, file=None, line=None):
        st = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in st[-4:][::-1])] += 1
    old = warnings.showwarning; warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("always"); step(m, opt, ids)
    torch.cuda.set_sync_debug_mode(0); warnings.showwarning = old
    print(f"{arg}: synchronising calls in one step: {sum(sites.values())}")
    for k, v in sites.most_common(8): print("   ", v, k)
    torch.cuda.synchronize()
    pr = cProfile.Profile(); pr.enable(); step(m, opt, ids); torch.cuda.synchronize(); pr.disable()
    out = io.StringIO(); pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(35); print(out.getvalue()[-9000:], flush=True)
    del m, opt; torch.cuda.empty_cache()
