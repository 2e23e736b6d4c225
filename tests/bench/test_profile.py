"""`compare --profile`: the kernel-name classifier, the profiled step, the report section, old files."""
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fastbench.bench import report, results as results_io
from fastbench.bench.cli import summarize_results
from fastbench.bench.profile import NAMES, classify, profile_step, summarize_times
from fastbench.cli import main

# names as torch.profiler reports them: cuBLAS/cutlass, Triton (the function names in kernels/*.py),
# bitsandbytes, PyTorch's CUDA kernels, CUDA copies, and CPU ops
KERNELS = {
    "matmul": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
        "_kernel__5x_cublas",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>"
        "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8::Params)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, "
        "false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*)",
        "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
    ],
    "dequantize": [
        "_dequantize_nf4_kernel",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>"
        "(float*, unsigned char*, float*, __nv_bfloat16*, int, int)",
        "void kDequantizeBlockwise<float, 512, 64, 8, 0>(float*, unsigned char*, float*, float*, int, int)",
        "bitsandbytes::dequantize_4bit",
    ],
    "norms": ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "aten::rms_norm",
              "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>"
              "(int, float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, "
              "c10::BFloat16*)"],
    "rope": ["_rope_kernel"],
    "activations": [
        "_glu_fwd_kernel", "_glu_bwd_kernel", "aten::silu", "aten::silu_backward",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel"
        "(at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda()#7}::operator()() const::"
        "{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, ..., std::array<char*, 2ul>)",
    ],
    "loss": [
        "_cross_entropy_rows_kernel",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, long>"
        "(float*, float*, float const*, long const*, float const*, bool, long, long, long, long)",
        "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
    ],
    "attention": [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, true, false, "
        "false, false, true, false, false>(pytorch_flash::Flash_fwd_params)",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, "
        "2, 4, 2, false, false, cutlass::bfloat16_t>, true, false, false, false, false, false>"
        "(pytorch_flash::Flash_bwd_params)",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ],
    "offload": ["Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pinned -> Device)",
                "Memcpy DtoH (Device -> Pageable)"],
    "optimizer": [
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)1, false>, float*, double, double, double, double, double, bool, float*, float*, "
        "float>(at::native::(anonymous namespace)::TensorListMetadata<4>, ...)",
        "aten::_fused_adamw_", "aten::_foreach_addcdiv_", "Optimizer.step#AdamW.step",
    ],
    "other": [
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
        "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, "
        "std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>>(int, ...)",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
        "float>, unsigned int, float, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
        "float>, unsigned int, float, 4>)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<"
        "at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>(...)",
        "Memcpy DtoD (Device -> Device)", "Memset (Device)", "aten::copy_", "aten::mean", "cudaLaunchKernel",
        "set_property_kernel",
    ],
}


@pytest.mark.parametrize("region, name", [(region, name) for region, names in KERNELS.items() for name in names])
def test_classify_representative_kernel_names(region, name):
    assert classify(name) == region


def test_summarize_times_sums_per_region_and_names_the_largest_other(rng):
    times = {name: float(rng.uniform(1, 1000)) for names in KERNELS.values() for name in names}
    s = summarize_times(times, top=3)
    assert list(s["ms"]) == list(NAMES)
    for region, names in KERNELS.items():
        assert s["ms"][region] == pytest.approx(sum(times[n] for n in names) / 1e3, rel=1e-12)
    assert s["total_ms"] == pytest.approx(sum(times.values()) / 1e3, rel=1e-12)
    others = sorted(KERNELS["other"], key=lambda n: -times[n])[:3]
    assert [n for n, _ in s["top_other"]] == [n[:160] for n in others]
    assert [t for _, t in s["top_other"]] == pytest.approx([times[n] / 1e3 for n in others])


def _tiny_step(rng):
    """A step with a matmul, a cross-entropy and an AdamW update (fresh random inputs)."""
    w = torch.nn.Parameter(torch.randn(48, 37))
    opt = torch.optim.AdamW([w], lr=1e-3)
    x = torch.randn(29, 48)
    labels = torch.from_numpy(rng.integers(0, 37, 29))

    def step():
        loss = F.cross_entropy(x @ w, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def test_profile_step_on_cpu(rng):
    p = profile_step(_tiny_step(rng), cuda=False)
    assert p["activity"] == "cpu" and p["wall_ms"] > 0
    for region in ("matmul", "loss", "optimizer"):
        assert p["ms"][region] > 0, (region, p)
    assert p["total_ms"] == pytest.approx(sum(p["ms"].values()))
    assert 0 < p["host"]["issue_ms"] <= p["host"]["step_ms"]
    assert json.loads(json.dumps(p)) == p


def test_report_says_when_the_host_cpu_bounds_the_step(tmp_path, rng, make_record, make_results):
    recs = [make_record(a, rng=rng) for a in ("peft", "qlora")]
    for r, issue in zip(recs, (398.0, 120.0)):
        r["profile"] = {**_profile(rng), "host": {"issue_ms": issue, "step_ms": 400.0}}
    res = make_results(recs, ["peft", "qlora"])
    res["summary"] = summarize_results(res)
    text = open(report.write_report(res, str(tmp_path))).read()
    peft = next(line for line in text.splitlines() if line.startswith("- peft: profiled step"))
    qlora = next(line for line in text.splitlines() if line.startswith("- qlora: profiled step"))
    assert "398.0 of its 400.0 ms (100%: CPU-bound)" in peft
    assert "120.0 of its 400.0 ms (30%)" in qlora and "CPU-bound" not in qlora


def test_host_issue_reports_the_offload_waits_where_an_offloader_exists():
    """Given the model's offloader (a fused offload arm), the unprofiled step also says, on a GPU, how long the
    compute stream waited for copies out and for inputs fetched back (here: a CPU, so None)."""
    from fastbench.bench.profile import host_issue
    from fastbench.fused.checkpointing import HostOffloader

    assert "copy_wait_ms" not in host_issue(lambda: None, lambda: None)  # no offloader: the figures do not apply
    got = host_issue(lambda: None, lambda: None, HostOffloader())
    assert got["copy_wait_ms"] is None and got["fetch_wait_ms"] is None


def test_timed_waits_sums_each_kind_of_wait_and_stops_timing_after():
    from fastbench.fused.checkpointing import HostOffloader

    class Before:
        def __init__(self, ms): self.ms = ms
        def elapsed_time(self, after): return self.ms

    offloader = HostOffloader()
    with offloader.timed_waits() as total:
        offloader._timed["in"] += [(Before(1.5), None), (Before(0.25), None)]
        offloader._timed["out"].append((Before(4.0), None))
        assert total() == (pytest.approx(4.0), pytest.approx(1.75))
    assert offloader._timed is None


def test_report_gives_the_offload_waits_of_the_profiled_arm(tmp_path, rng, make_record, make_results):
    recs = [make_record("fused-4bit", rng=rng)]
    recs[0]["profile"] = {**_profile(rng), "host": {"issue_ms": 390.0, "step_ms": 400.0, "copy_wait_ms": 12.5,
                                                     "fetch_wait_ms": 30.25}}
    res = make_results(recs, ["fused-4bit"])
    res["summary"] = summarize_results(res)
    text = open(report.write_report(res, str(tmp_path))).read()
    assert ("the compute stream waited 12.5 ms for copies to the host (the copy queue full) and 30.2 ms for "
            "inputs fetched back" in text)


def test_union_of_kernel_intervals():
    from fastbench.bench.profile import union_ms

    assert union_ms([]) == 0
    # overlapping, nested, touching and disjoint spans (ns), out of order
    spans = [(5_000_000, 7_000_000), (0, 2_000_000), (1_000_000, 3_000_000), (1_500_000, 1_600_000),
             (3_000_000, 4_000_000)]
    assert union_ms(spans) == pytest.approx(6.0)  # [0, 4] and [5, 7] ms


def test_compute_stream_is_the_busiest_and_copies_do_not_count():
    from torch.autograd import DeviceType

    from fastbench.bench.profile import compute_stream_busy_ms

    class Event:
        def __init__(self, name, stream, start_ms, ms, device=DeviceType.CUDA):
            self.args = name, stream, int(start_ms * 1e6), int(ms * 1e6), device

        def name(self): return self.args[0]
        def device_resource_id(self): return self.args[1]
        def start_ns(self): return self.args[2]
        def duration_ns(self): return self.args[3]
        def device_type(self): return self.args[4]

    events = [Event("gemm", 7, 0, 2), Event("gemm", 7, 1, 2), Event("_rms_norm_fwd_kernel", 7, 4, 1),
              Event("Memcpy DtoH (Device -> Pinned)", 20, 0, 9), Event("small", 20, 9, 0.5),
              Event("aten::mm", 0, 0, 50, DeviceType.CPU)]
    assert compute_stream_busy_ms(events) == pytest.approx(4.0)  # stream 7: [0, 3] and [4, 5] ms
    assert compute_stream_busy_ms([events[-1]]) is None


def test_report_says_how_long_the_gpu_stream_sat_idle(tmp_path, rng, make_record, make_results):
    recs = [make_record("qlora", rng=rng)]
    recs[0]["profile"] = {**_profile(rng), "host": {"issue_ms": 300.0, "step_ms": 400.0}, "gpu_busy_ms": 350.0}
    res = make_results(recs, ["qlora"])
    res["summary"] = summarize_results(res)
    text = open(report.write_report(res, str(tmp_path))).read()
    assert "compute stream ran kernels for 350.0 ms of it (idle 50.0 ms" in text
    frame = results_io.long_frame(res)
    assert frame[frame.metric == "profile_gpu_busy_ms"].value.tolist() == [350.0]


@pytest.mark.gpu
def test_profile_step_on_gpu_sees_kernels_and_copies():
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    pinned = torch.empty(1024, 1024, dtype=torch.bfloat16, pin_memory=True)
    w = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))
    opt = torch.optim.AdamW([w], fused=True)
    labels = torch.randint(0, 1024, (1024,), device="cuda")

    def step():
        pinned.copy_(x, non_blocking=True)
        F.cross_entropy((x.float() @ w), labels).backward()
        opt.step()

    p = profile_step(step, cuda=True)
    assert p["activity"] == "cuda"
    assert 0 < p["gpu_busy_ms"] <= p["wall_ms"]
    for region in ("matmul", "loss", "optimizer", "offload"):
        assert p["ms"][region] > 0, (region, p)


def _profile(rng, arm_scale=1.0):
    ms = {k: float(rng.uniform(1, 50)) * arm_scale for k in NAMES}
    return {"activity": "cuda", "wall_ms": 400.0, "ms": ms, "total_ms": sum(ms.values()),
            "top_other": [["void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", 3.5]]}


def test_report_section_per_model_and_arm(tmp_path, rng, make_record, make_results):
    recs = [make_record(a, model=m, repeat=i, rng=rng)
            for i in range(2) for m in ("m1", "m2") for a in ("peft", "qlora")]
    for r in recs:
        r["profile"] = _profile(rng)
    recs[-1]["profile"] = {"error": "OutOfMemoryError: while profiling"}
    res = make_results(recs, ["peft", "qlora"], models=("m1", "m2"), repeats=2)
    res["summary"] = summarize_results(res)
    text = open(report.write_report(res, str(tmp_path))).read()
    section = text[text.index("## Where the time goes"):]
    assert "### m1" in section and "### m2" in section
    assert "| region | peft ms | peft % | qlora ms | qlora % |" in section
    m1 = [r["profile"]["ms"] for r in recs if r["model"] == "m1" and r["arm"] == "qlora"]
    mean = {k: sum(p[k] for p in m1) / len(m1) for k in NAMES}
    share = 100 * mean["matmul"] / sum(mean.values())
    m1_table = section[section.index("### m1"):section.index("### m2")]
    matmul_row = next(line for line in m1_table.splitlines() if line.startswith("| matmul |"))
    assert [c.strip() for c in matmul_row.strip("|").split("|")][3:5] == [f"{mean['matmul']:,.1f}", f"{share:.1f}"]
    assert "| **total** |" in m1_table and "CUDAFunctor_add" in m1_table
    assert "profiling failed for qlora on m2, repeat 2: OutOfMemoryError" in section


def test_files_without_profile_still_read_and_report(tmp_path, rng, make_record, make_results):
    recs = [make_record(a, rng=rng) for a in ("peft", "qlora")]
    recs[1]["profile"] = _profile(rng)
    res = make_results(recs, ["peft", "qlora"])
    res["summary"] = summarize_results(res)
    path = results_io.write(res, str(tmp_path))
    frame = results_io.long_frame(res)
    rows = frame[frame.metric == "profile_matmul_ms"]
    assert list(rows.arm) == ["qlora"] and rows.value.iloc[0] == recs[1]["profile"]["ms"]["matmul"]

    old = json.loads(open(path).read())  # written before --profile existed: no "profile" anywhere
    for r in old["runs"]:
        del r["profile"]
    del old["compare"]["run"]["profile"]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    back = results_io.read(str(old_path))
    back["summary"] = summarize_results(back)
    assert not results_io.long_frame(back).metric.str.startswith("profile_").any()
    text = open(report.write_report(back, str(tmp_path / "reports"))).read()
    assert "Where the time goes" not in text


def test_from_an_older_file_reruns_it_with_profile(tmp_path, rng, make_record, make_results, monkeypatch):
    from fastbench.bench import runner

    old = make_results([make_record("peft", model="llama-3-8b-tiny", rng=rng)], ["peft"], models=["llama-3-8b-tiny"])
    for r in old["runs"]:
        del r["profile"]
    del old["compare"]["run"]["profile"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    configs = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        configs.append(run_config)
        record = make_record(label, model=model, repeat=repeat, rng=rng)
        record["profile"] = _profile(rng)
        return record

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    out = CliRunner().invoke(main, ["compare", "--from", str(path), "--profile", "--results-dir", str(tmp_path / "r"),
                                    "--reports-dir", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    assert [c["profile"] for c in configs] == [True]
    (report_path,) = (tmp_path / "p").glob("*.md")
    assert "## Where the time goes" in report_path.read_text()
