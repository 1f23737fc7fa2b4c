"""Attention with the paper's partially fused softmax, and the materialized-softmax reference.

(Triton kernels and launcher: issue 3.)
"""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, upcast: bool = False
) -> torch.Tensor:
    """Materialized softmax: S = q kᵀ·scale, P = softmax(S), P v. q [B,H,Nq,D], k/v [B,H,Nk,D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
        return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    return torch.matmul(s.softmax(dim=-1), v)


def attention_partial_softmax(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    raise NotImplementedError("partially fused softmax attention not written yet")
