"""The UNet up path's ResNet input, cat([x, skip], dim=1), without forming it.

Each up-path ResNet block reads its concatenated input twice: norm1 (GroupNorm+SiLU, whose output feeds
conv1) and the 1x1 conv shortcut (C1 + C2 != C_out in every up block). With fused epilogues the up block
hands the two parts over in a :class:`Concat` box instead of a new [B, C1 + C2, H, W] tensor: norm1 reads
both sources in one kernel (``group_norm(x, ..., concat=skip)``) and the shortcut is two GEMMs over the
split weight, W[:, :C1]·x + W[:, C1:]·skip, the second accumulating into the first's output in place.
"""

from __future__ import annotations

import torch

from speedsd import ops


class Concat:
    """cat([x, skip], dim=1), not materialized: a box its reader :meth:`take` s the two parts out of.

    Like :class:`speedsd.models.layers.Owned` the box is the caller's only reference to ``x`` (the up block
    rebinds its name to the box), so x is freed as soon as the reader drops it; ``skip`` stays the caller's.
    Neither part is ever written.
    """

    __slots__ = ("_parts",)

    def __init__(self, x: torch.Tensor, skip: torch.Tensor) -> None:
        if x.shape[:1] + x.shape[2:] != skip.shape[:1] + skip.shape[2:] or x.dtype != skip.dtype:
            raise ValueError(f"cannot concatenate {tuple(x.shape)} {x.dtype} and {tuple(skip.shape)} {skip.dtype}")
        self._parts: tuple[torch.Tensor, torch.Tensor] | None = (x, skip)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, skip); the box is empty afterwards."""
        if self._parts is None:
            raise RuntimeError("this Concat box was already taken")
        parts, self._parts = self._parts, None
        return parts

    def materialize(self) -> torch.Tensor:
        """The concatenation as one tensor (the paths that have no two-source reader); empties the box."""
        return torch.cat(self.take(), dim=1)  # [B, C1, ...] ++ [B, C2, ...] -> [B, C1 + C2, ...]


def split_shortcut(
    x: torch.Tensor, skip: torch.Tensor, conv: torch.nn.Conv2d, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """conv(cat([x, skip], dim=1)) (+ bias) for a 1x1 stride-1 ``conv``, as two GEMMs over its split weight
    (views of the parameter, no copies): out = W[:, :C1]·x (+ bias), then out += W[:, C1:]·skip in place.

    channels_last inputs (both): GEMMs over the pixels, [B·H·W, C] @ [C, Co], the output channels_last
    [B, Co, H, W] as conv2d_op's 1x1 GEMM makes it; otherwise per-sample [Co, C] @ [C, H·W] products
    (NCHW output). Values: the concatenated conv's to the output dtype's rounding (the partial sum is
    rounded once more).
    """
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or x.dim() != 4:
        raise ValueError("split_shortcut takes a 1x1 stride-1 conv of 4-D inputs")
    c1, c2 = x.shape[1], skip.shape[1]
    if conv.in_channels != c1 + c2:
        raise ValueError(f"the conv takes {conv.in_channels} channels, the parts have {c1} + {c2}")
    w = conv.weight.flatten(1)  # [Co, C1 + C2, 1, 1] -> [Co, C1 + C2] (a view)
    w1, w2 = w[:, :c1], w[:, c1:]  # strided views of the parameter
    n, _, h, wd = x.shape
    co = w.shape[0]
    cl = torch.channels_last
    if x.is_contiguous(memory_format=cl) and skip.is_contiguous(memory_format=cl):
        out = ops.linear_op(x.permute(0, 2, 3, 1), w1, bias)  # [N, H, W, C1] -> [N, H, W, Co]
        rows = skip.permute(0, 2, 3, 1).reshape(-1, c2)  # [N, H, W, C2] -> [N·H·W, C2] (a view)
        ops.linear_accumulate_op(out.view(-1, co), rows, w2)  # [N·H·W, Co] += [N·H·W, C2] @ [C2, Co]
        return out.permute(0, 3, 1, 2)  # [N, Co, H, W] with channels_last strides
    x, skip = x.contiguous(), skip.contiguous()
    out = torch.matmul(w1, x.view(n, c1, h * wd))  # [Co, C1] @ [N, C1, HW] -> [N, Co, HW]
    if bias is not None:
        out += bias[:, None]
    out.baddbmm_(w2.expand(n, -1, -1), skip.view(n, c2, h * wd))  # += [Co, C2] @ [N, C2, HW]
    return out.view(n, co, h, wd)
