"""Fused GELU / GEGLU (SD's feed-forward: projection, split, value·GELU(gate)) and references.

(Triton kernels and launchers: issue 3.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU; approximate = "none" (erf), "tanh", or "quick" (x·sigmoid(1.702x), OpenAI CLIP)."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate=approximate)


def geglu_ref(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """[..., 2F] -> [..., F]: first half is the value, second half the gate (diffusers' GEGLU)."""
    value, gate = h.chunk(2, dim=-1)
    return value * gelu_ref(gate, approximate)


def feed_forward_geglu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """x [..., K], weight [2F, K] -> [..., F]: cuBLAS GEMM, then chunk + gelu + mul."""
    return geglu_ref(F.linear(x, weight, bias), approximate)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    raise NotImplementedError("GELU kernel not written yet")


def geglu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    raise NotImplementedError("GEGLU kernel not written yet")


def feed_forward_geglu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    raise NotImplementedError("fused GEGLU feed-forward kernel not written yet")
