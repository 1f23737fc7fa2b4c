"""Peak bytes of live tensor storage during a piece of code, on any device (tests use CPU).

    with LiveBytes() as mem:
        y = decoder(z)
    mem.peak   # the high-water mark of the storages created inside the block that were alive at once

A TorchDispatchMode sees every aten op's outputs. An output whose storage is none of the op's
inputs' (tensors or storages: empty, convolution, add, a copying ``contiguous`` ...) is new memory and
opens an entry with that storage's nbytes; an output on an input's storage (views, set_, in-place and
out= ops, a ``contiguous`` that returns its input) only adds a reference to an entry already open, so
weights, inputs and other storages made before the block never count. Each counted tensor gets a
``weakref.finalize``; the entry closes, and its bytes leave the live total, when the last of its
tensors is gone. Each storage counts once however many views of it exist.

What this measures is the set of op outputs alive at once: the quantity a GPU's caching allocator
sees as activations, less the scratch space kernels allocate internally (cuDNN workspaces; on CPU
oneDNN's buffers) and rounding. Triton kernels under the interpreter work on the tensors' own memory
(its host copies of CPU tensors are the same storages), so their outputs are the ``torch.empty``
allocations their launchers make.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor | torch.UntypedStorage) -> int | None:
    """The storage's identity (its StorageImpl; also on the meta device, where data_ptr is 0)."""
    s = t.untyped_storage() if isinstance(t, torch.Tensor) else t
    return None if s.nbytes() == 0 else s._cdata


class LiveBytes(TorchDispatchMode):
    """Tracks ``live`` (bytes of open storages now) and ``peak`` (their maximum) while active.
    ``trace``: (op name, live bytes after it) for every op that opened a storage, for diagnostics."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.trace: list[tuple[str, int]] = []
        self._open: dict[int, list[int]] = {}  # key -> [nbytes, live tensors referencing it]

    def _close_ref(self, key: int) -> None:
        entry = self._open.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._open[key]

    def _count(self, t: torch.Tensor, fresh: bool) -> None:
        key = _storage_key(t)
        if key is None:
            return
        entry = self._open.get(key)
        if entry is None:
            if not fresh:  # a view of (or a write into) memory made before the block: not counted
                return
            entry = self._open[key] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._close_ref, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {
            _storage_key(a)
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, (torch.Tensor, torch.UntypedStorage))
        }
        out = func(*args, **kwargs)
        before = len(self._open)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t, fresh=_storage_key(t) not in inputs)
        if len(self._open) > before:
            self.trace.append((str(func), self.live))
        return out
