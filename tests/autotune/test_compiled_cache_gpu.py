"""On the GPU machine: with this GPU's shipped compiled kernels installed into an empty Triton cache, the fused
training steps of a collected family and shape compile nothing (no kernel, no launcher)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fastbench.autotune import compiled_cache, lookup

pytestmark = pytest.mark.gpu

TOOL = pathlib.Path(__file__).parent.parent.parent / "tools" / "collect_compile_cache.py"


def test_a_collected_step_compiles_nothing_with_the_archive_installed(tmp_path):
    archive, why = compiled_cache.find_archive(lookup.Lookup())
    if archive is None:
        pytest.skip(f"no compiled kernels shipped for this GPU and toolchain: {why}")
    index = compiled_cache.read_index(archive)
    collected = index["collected"]
    family = next(iter(collected["families"]))
    env = {k: v for k, v in os.environ.items()
           if k not in (compiled_cache.OFF_ENV, lookup.OFF_ENV, lookup.PIN_ENV)}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), FASTBENCH_CACHE_DIR=str(tmp_path / "fastbench"))
    out = tmp_path / "run.json"
    subprocess.run([sys.executable, str(TOOL), "--child", family, "--out", str(out), "--layers",
                    str(collected["layers"]), "--bases", collected["bases"][-1], "--checkpointing",
                    collected["checkpointing"][-1], "--shapes", collected["shapes"][0]],
                   env=env, check=True, timeout=600)
    result = json.loads(out.read_text())
    record = result["compiled_cache"]
    assert record["skipped_reason"] is None and record["installed"] == len(index["entries"]), record
    assert result["compiled"] == 0, result["runs"]
    assert [r["cache_entries_added"] for r in result["runs"]] == [0] * len(result["runs"]), result["runs"]
