"""Per-shape choice of attention implementation for Flags(attention="auto") (issue 5)."""

from __future__ import annotations

import torch


def choose(q_shape: torch.Size, k_shape: torch.Size, dtype: torch.dtype) -> str:
    return "sdpa"
