"""Parameters combined at run time: several as the row blocks of ONE tensor, for one GEMM over all of them
(fused QKV, the cross-attention K/V of every layer) while each stays its own parameter (a view of its
block); and tensors derived from parameters (summed biases), made once and kept while their sources hold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fused_rows(params: list[torch.Tensor], cached: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor whose consecutive row blocks ARE ``params`` (concatenated along dim 0).

    The first call concatenates and re-points each parameter at its block, so the parameters become
    views of the result: one GEMM can use all of them while state-dict keys, in-place loads
    (``load_state_dict`` copies into the views) and memory stay those of the separate weights.
    ``cached`` (the previous result) is returned while every parameter is still its view; after a
    parameter was replaced (``.to(dtype)``, ``param.data = ...``) the fusion is redone.
    """
    if cached is not None and _still_rows_of(params, cached):
        return cached
    adjacent = _adjacent_rows(params)
    if adjacent is not None:  # already back to back in one buffer (speedsd.arena lays them out so)
        return adjacent
    with torch.inference_mode(False):  # parameters must stay normal tensors, also under inference mode
        fused = torch.cat([p.detach() for p in params])  # k x [R_i, ...] -> [ΣR_i, ...]
        start = 0
        for p in params:
            p.data = fused[start : start + p.shape[0]]
            start += p.shape[0]
    return fused


def _adjacent_rows(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The concatenation of ``params`` as a view, when each starts where the previous one ends in the
    same storage (same dtype, trailing shape, contiguous); None otherwise."""
    first = params[0].detach()
    end = first.data_ptr()
    for p in params:
        if (
            p.dtype != first.dtype
            or p.shape[1:] != first.shape[1:]
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.data_ptr() != end
        ):
            return None
        end += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in params)
    with torch.inference_mode(False):
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _still_rows_of(params: list[torch.Tensor], fused: torch.Tensor) -> bool:
    row_bytes = (fused.stride(0) if fused.dim() > 1 else 1) * fused.element_size()
    start = 0
    for p in params:
        if p.dtype != fused.dtype or p.device != fused.device or p.data_ptr() != fused.data_ptr() + start * row_bytes:
            return False
        start += p.shape[0]
    return start == fused.shape[0]


def derived(cache: dict[str, object], sources: list[torch.Tensor], make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` (a tensor computed from parameters ``sources``), kept in ``cache`` while every source is the
    same storage at the same version: computed once, not a kernel launch every forward, and redone after a
    reload in place or a replaced parameter. Inference-mode sources have no version counter: made each call."""
    if any(t.is_inference() for t in sources):
        return make()
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
    if cache.get("key") != key:
        with torch.inference_mode(False):  # a normal tensor, also when first made under inference mode
            cache["value"] = make().detach()
        cache["key"] = key
    return cache["value"]  # type: ignore[return-value]
