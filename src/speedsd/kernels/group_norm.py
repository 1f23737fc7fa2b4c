"""Fused GroupNorm (+SiLU) in one Triton launch, and its plain-torch reference.

(Triton kernel and launcher: issue 3.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """torch's GroupNorm, then SiLU when asked: the unfused baseline."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    raise NotImplementedError("fused GroupNorm kernel not written yet")
