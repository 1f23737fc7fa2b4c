"""Facts about the device a kernel launches on, shared by the launchers' heuristics."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 under the CPU interpreter: keeps grids small)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
