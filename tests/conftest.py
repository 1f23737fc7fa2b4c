"""Test setup: without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before speedsd.kernels
is imported, so it is set here at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_flags():
    from speedsd import ops

    torch.manual_seed(0)
    prev = ops.current()
    yield
    ops.set_flags(prev)
