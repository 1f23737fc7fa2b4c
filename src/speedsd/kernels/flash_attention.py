"""FlashAttention forward in Triton (online softmax, no N×N tensor) and its reference.

(Triton kernel and launcher: issue 3.)
"""

from __future__ import annotations

import torch


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    raise NotImplementedError("flash attention kernel not written yet")
