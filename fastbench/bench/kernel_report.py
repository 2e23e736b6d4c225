"""Markdown report of a kernel-benchmark run (``pytest tests/benchmarks --benchmark-json=...``).

``python -m fastbench.bench.kernel_report results/kernels/X.json reports/X.md``: one table per op,
each row an implementation at one shape, with the achieved bandwidth against the copy ceiling (memory
bound ops) or the time and peak memory against the reference (fused linear cross-entropy).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

COPY_CEILING_GBPS = 4300.0  # device-to-device copy on the H200, bytes read + written (DESIGN/KINDS)


def load(path: str | Path) -> pd.DataFrame:
    rows = []
    for bench in json.loads(Path(path).read_text())["benchmarks"]:
        info = dict(bench["extra_info"])
        info["ms"] = info.get("ms", info.get("median_ms"))
        info["gb_per_s"] = info.get("gb_per_s", info.get("gbps"))
        rows.append(info)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        if v != v:  # NaN: the column does not apply to this row
            return ""
        return f"{v:,.0f}" if float(v).is_integer() else f"{v:,}"

    cells = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _bandwidth_table(df: pd.DataFrame) -> str:
    df = df.copy()
    df["% of copy"] = (100 * df["gb_per_s"] / COPY_CEILING_GBPS).round(0)
    keys = [k for k in ("model", "rows", "cols", "tokens", "pass_name") if k in df and df[k].notna().any()]
    cols = keys + ["impl", "ms", "gb_per_s", "% of copy"] + (["timing"] if "timing" in df else [])
    return markdown_table(df[cols].round({"ms": 4, "gb_per_s": 0}))


def _lce_table(df: pd.DataFrame) -> str:
    df = df.copy()
    ref = df[df.impl == "eager"].set_index(["tokens", "vocab"])
    df["time vs eager"] = [r.ms / ref.loc[(r.tokens, r.vocab), "ms"] for r in df.itertuples()]
    df["peak vs eager"] = [r.peak_gib / ref.loc[(r.tokens, r.vocab), "peak_gib"] for r in df.itertuples()]
    cols = ["tokens", "hidden", "vocab", "impl", "ms", "peak_gib", "time vs eager", "peak vs eager"]
    return markdown_table(df[cols].round({"ms": 2, "peak_gib": 2, "time vs eager": 2, "peak vs eager": 3}))


def render(df: pd.DataFrame, source: str) -> str:
    out = [f"# Kernel benchmarks\n\nSource: `{source}`. Times are medians: `cuda_graph` is GPU time without the "
           f"launch cost (fastbench.bench.gpu_timing; a backward is (forward + backward) - forward), "
           f"`do_bench` (and rows without a timing column) is `triton.testing.do_bench`, launch cost included; "
           f"bandwidth counts each input read once and each output written once, against the "
           f"{COPY_CEILING_GBPS:,.0f} GB/s copy ceiling measured on the H200.\n"]
    for op, group in df.groupby("op", sort=False):
        out.append(f"## {op}\n")
        out.append(_lce_table(group) if op == "linear_cross_entropy" else _bandwidth_table(group))
        out.append("")
    return "\n".join(out)


def main(argv=None):
    src, dst = (argv or sys.argv[1:])[:2]
    Path(dst).write_text(render(load(src), src))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
