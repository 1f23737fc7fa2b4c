"""Test setup: without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before speedsd.kernels
is imported, so it is set here at collection time.
"""

import os
import sys

import pytest
import torch

# Shared test helpers (tests/checkpoints.py) import as `from checkpoints import ...`, whether or not
# tests/ is a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(), which
    # numpy >= 2.4 refuses: every loop with a runtime bound (`for i in range(0, n)`) fails. Convert via
    # .item() instead (the same value; restored with the rest of the interpreter's patches).
    import triton.runtime.interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor_np24(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor_np24

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (several spin-wait for ages on a busy 2-core CI box).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
