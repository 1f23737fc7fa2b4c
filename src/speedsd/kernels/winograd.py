"""Winograd F(m×m, 3×3) convolution in Triton, m in {2, 4, 6}, and its plain-torch reference.

(Kernels, launcher, per-layer table: issue 4.)
"""

from __future__ import annotations

import torch


def winograd_conv3x3_module(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor | None:
    """The engine's entry: conv's forward by Winograd if the per-layer table picks a tile, else None."""
    return None
