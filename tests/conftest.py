"""Shared test setup. Without a GPU, Triton kernels run under the interpreter (set before triton loads)."""
import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test run (never a fixed one): inputs differ every run; the seed is printed on failure."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
