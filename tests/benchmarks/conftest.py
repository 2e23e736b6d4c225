"""Kernel microbenchmarks (GPU only): files named bench_*.py are collected here too, and every item in
this folder is marked `gpu`.

Run on the GPU machine: `pytest tests/benchmarks -m gpu --benchmark-only --benchmark-json=OUT.json`
(`--benchmark-only` overrides the `--benchmark-skip` that pyproject.toml adds, so that `pytest -m gpu` runs the
checks without them).
"""
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_itemcollected(item):
    if HERE in Path(item.path).parents:
        item.add_marker(pytest.mark.gpu)
