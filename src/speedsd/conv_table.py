"""Per-card, per-shape choice between cuDNN and the implicit-GEMM Triton conv (``Flags.igemm_conv``).

Measured, not guessed: ``python -m speedsd.bench.kernels_conv --table src/speedsd/data/conv_table.json``
times every candidate launch shape of :func:`speedsd.kernels.conv_igemm.conv2d_igemm` on the SD convs
that cuDNN runs below the card's rate, against cuDNN, in CUDA-graph replay, and records per card the
winner and its launch shape. A card or shape not in the table runs cuDNN.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from speedsd.attention_table import write_card_table
from speedsd.kernels.conv_igemm import IgemmConfig

TABLE_PATH = Path(__file__).parent / "data" / "conv_table.json"


def shape_key(x_shape: tuple[int, ...], n: int, kernel: int, stride: int, padding: int, dtype: torch.dtype) -> str:
    b, c, h, w = x_shape
    return f"{b}x{c}x{h}x{w}->{n} k{kernel} s{stride} p{padding} {str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=8)
def _table(card: str, path: str) -> dict[str, IgemmConfig]:
    p = Path(path)
    if not p.exists():
        return {}
    entries = json.loads(p.read_text()).get("cards", {}).get(card, {})
    return {key: IgemmConfig.parse(e["config"]) for key, e in entries.items() if e.get("best") == "igemm"}


@functools.lru_cache(maxsize=16)
def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choose(
    x_shape: tuple[int, ...], n: int, kernel: int, stride: int, padding: int, dtype: torch.dtype, device: torch.device
) -> IgemmConfig | None:
    """The measured launch shape when the Triton conv beat cuDNN on this device's card and shape, else None."""
    return _table(card_name(device), str(TABLE_PATH)).get(shape_key(x_shape, n, kernel, stride, padding, dtype))


def merge_into(path: Path, card: str, table: dict) -> None:
    """Record one card's measured conv table (other cards' entries are kept)."""
    write_card_table(path, card, table)
    _table.cache_clear()
