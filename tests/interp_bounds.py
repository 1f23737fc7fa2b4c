"""Out-of-bounds detector for Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1).

The interpreter turns a bad address into a silent host read/write (or nothing at all), while the GPU
raises "illegal memory access" and poisons the CUDA context. Inside :func:`bounds_checked`, every
load/store checks that each *active* lane (mask true) addresses a whole element inside the storage
of one of the launched kernel's tensor arguments; a violation raises :class:`OutOfBounds` naming the
lane count and the first bad byte offset. Use it with the GPU launch configs forced (``config=...``)
to exercise tilings the interpreter's own small configs never reach.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest

# Kernels on CPU tensors run only under the Triton interpreter (CI); a CUDA machine runs them on the GPU.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1 (set without CUDA)"
)


class OutOfBounds(AssertionError):
    pass


@contextlib.contextmanager
def bounds_checked() -> Iterator[list[int]]:
    """Patch the interpreter so masked-in lanes outside every argument storage raise OutOfBounds.

    Yields a list that collects the number of lanes checked (to assert the patch was active)."""
    import triton.runtime.interpreter as interp

    builder = interp.interpreter_builder
    ranges: list[tuple[int, int]] = []  # [start, end) byte ranges of the current launch's storages
    checked: list[int] = [0]
    orig_init = interp.GridExecutor._init_args_hst
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if hasattr(a, "untyped_storage"):
                st = a.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what: str) -> None:
        elem = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addr = ptrs.data.astype(np.uint64)
        m = np.broadcast_to(mask.data.astype(bool), addr.shape)
        live = addr[m]
        checked[0] += live.size
        if live.size == 0:
            return
        ok = np.zeros(live.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (live >= lo) & (live + elem <= hi)
        if not ok.all():
            bad = live[~ok]
            lo = min(r[0] for r in ranges)
            raise OutOfBounds(
                f"{what}: {bad.size} of {live.size} active lanes out of bounds "
                f"(first at byte {int(bad[0]) - lo:+d} from the lowest argument storage; grid idx "
                f"{builder.grid_idx})"
            )

    def load(ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return orig_load(ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return orig_store(ptrs, value, mask, *rest)

    interp.GridExecutor._init_args_hst = init_args
    builder.create_masked_load = load
    builder.create_masked_store = store
    try:
        yield checked
    except Exception as e:  # the interpreter wraps kernel errors in InterpreterError
        if isinstance(e.__cause__, OutOfBounds):
            raise e.__cause__ from None
        raise
    finally:
        interp.GridExecutor._init_args_hst = orig_init
        del builder.create_masked_load, builder.create_masked_store  # back to the class methods
