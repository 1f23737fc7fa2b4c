"""A model's weights in ONE device allocation: no per-tensor rounding, no holes, fusions for free.

Loading tensor by tensor leaves the caching allocator with one block per weight, each rounded up
(large blocks to 2 MiB, small ones packed into 20 MiB segments), and every later change of a weight
(a channels_last conversion, concatenating Q/K/V for one GEMM) frees blocks in the middle of
segments that stay reserved. Measured on an H200 (SD-1.4, fp16): 257 MiB reserved and never used
next to 2034 MiB of weights.

:func:`allocate` lays every floating-point tensor of a model's state dict out in one byte buffer:
first the groups the model fuses at run time (``model.weight_groups()``: each group's tensors back to
back, in order, so :func:`speedsd.models.fused_rows.fused_rows` finds them adjacent and returns a view
instead of a concatenated copy), then everything else, each tensor 256-byte aligned, 4-D conv weights
in the requested memory format. The loaders fill those views in place. :func:`relayout` converts
4-D weights between NCHW and channels_last inside their own bytes, so a pipeline with other flags
does not allocate a second copy either.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ALIGN = 256  # bytes: every tensor (and every group) starts on this boundary


def weight_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that must lie back to back, in order (from ``model.weight_groups()`` if any)."""
    fn = getattr(model, "weight_groups", None)
    return fn() if callable(fn) else []


def _layout_order(keys: Iterable[str], groups: list[list[str]]) -> list[list[str]]:
    """Runs of keys to place contiguously: each group, then every other key alone."""
    keys = list(keys)
    grouped = [k for g in groups for k in g]
    if len(set(grouped)) != len(grouped):
        raise ValueError("a weight belongs to two fusion groups")
    missing = sorted(set(grouped) - set(keys))
    if missing:
        raise ValueError(f"fusion groups name weights the model does not have: {missing[:3]}")
    taken = set(grouped)
    return [list(g) for g in groups] + [[k] for k in keys if k not in taken]


def allocate(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype, channels_last: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Empty tensors for every entry of ``model.state_dict()`` (``model`` may live on the meta device).

    Floating-point entries become views of one uint8 buffer (returned second; None when there are
    none) in ``dtype``; others (integer buffers) are allocated on their own. 4-D tensors get
    channels_last strides when ``channels_last``. Returns ({key: tensor}, buffer).
    """
    device = torch.device(device)
    state = model.state_dict(keep_vars=True)
    floats = [k for k, t in state.items() if t.is_floating_point()]
    size = torch.tensor([], dtype=dtype).element_size()
    offsets: dict[str, int] = {}
    total = 0
    for run in _layout_order(floats, weight_groups(model)):
        total = -(-total // ALIGN) * ALIGN  # each run starts aligned; a group's members follow back to back
        for k in run:
            offsets[k] = total
            total += state[k].numel() * size
    buf = torch.empty(total, dtype=torch.uint8, device=device) if floats else None
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k not in offsets:
            out[k] = torch.empty(t.shape, dtype=t.dtype, device=device)
            continue
        assert buf is not None
        flat = buf[offsets[k] : offsets[k] + t.numel() * size].view(dtype)
        if t.dim() == 4 and channels_last:
            n, c, h, w = t.shape
            out[k] = flat.view(n, h, w, c).permute(0, 3, 1, 2)  # [N, H, W, C] storage -> [N, C, H, W]
        else:
            out[k] = flat.view(t.shape)
    return out, buf


def relayout(model: nn.Module, memory_format: torch.memory_format) -> int:
    """Give every 4-D parameter ``memory_format`` strides, rewriting it inside its own bytes (one
    temporary copy per tensor, no new allocation held). Returns how many tensors changed."""
    changed = 0
    with torch.inference_mode(False), torch.no_grad():  # parameters stay normal tensors
        for p in model.parameters():
            if p.dim() != 4 or p.is_contiguous(memory_format=memory_format):
                continue
            if not p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=memory_format)  # not dense: a plain copy
                changed += 1
                continue
            tmp = p.data.contiguous(memory_format=memory_format)
            p.data = p.data.as_strided(tmp.shape, tmp.stride(), p.data.storage_offset())
            p.data.copy_(tmp)
            changed += 1
    return changed
