import json

from fastbench.bench.kernel_report import load, render


def test_kernel_report_tables(tmp_path):
    benches = [
        {"extra_info": {"op": "rms_norm", "model": "llama-3-8b", "tokens": 16384, "pass_name": "fwd",
                        "impl": "triton", "ms": 0.07, "gb_per_s": 3870.0}},
        {"extra_info": {"op": "nf4_dequantize", "rows": 4096, "cols": 4096, "impl": "fastbench",
                        "median_ms": 0.02, "gbps": 2150.0}},
        {"extra_info": {"op": "linear_cross_entropy", "impl": "fused", "tokens": 4096, "hidden": 64, "vocab": 512,
                        "median_ms": 2.0, "peak_gib": 0.5}},
        {"extra_info": {"op": "linear_cross_entropy", "impl": "eager", "tokens": 4096, "hidden": 64, "vocab": 512,
                        "median_ms": 4.0, "peak_gib": 4.0}},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    text = render(load(path), str(path))
    assert "## rms_norm" in text and "## nf4_dequantize" in text and "## linear_cross_entropy" in text
    assert "| llama-3-8b | 16,384 | fwd | triton | 0.07 | 3,870 | 90 |" in text  # 3870 / 4300 = 90 %
    assert "| 4,096 | 4,096 | fastbench | 0.02 | 2,150 | 50 |" in text
    assert "| 4,096 | 64 | 512 | fused | 2 | 0.5 | 0.5 | 0.125 |" in text
