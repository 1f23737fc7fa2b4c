"""Per-card, per-problem cuBLASLt algorithm for the UNet's linears (``Flags.gemm_algos``).

Measured, not guessed: ``python -m speedsd.bench.gemm_algos --table src/speedsd/data/gemm_table.json`` collects
the linears of one UNet step (:func:`speedsd.ops.linear_op` / ``linear_accumulate_op``), times each as torch runs
it and with every algorithm cuBLASLt's heuristic offers for it (CUDA-graph replay, weights cycled out of L2), and
records per card the fastest where it beats torch's by >= 3 %: its configuration (:data:`speedsd.cublaslt.
CONFIG_FIELDS`) and the two timings. A problem or card not in the table runs torch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from speedsd.attention_table import write_card_table
from speedsd.conv_table import card_name
from speedsd.cublaslt import Problem

TABLE_PATH = Path(__file__).parent / "data" / "gemm_table.json"


def problem_key(p: Problem) -> str:
    kind = "bias" if p.bias else "acc" if p.accumulate else "plain"
    return f"{p.m}x{p.k}->{p.n} ldx{p.ldx} ldw{p.ldw} {kind} a{p.align} {str(p.dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=8)
def _table(card: str, path: str) -> dict[str, dict[str, int]]:
    p = Path(path)
    if not p.exists():
        return {}
    out = {}
    for key, e in json.loads(p.read_text()).get("cards", {}).get(card, {}).items():
        cfg = e.get("config")
        if not isinstance(cfg, dict) or not all(isinstance(v, int) for v in cfg.values()):
            raise ValueError(f"{path}: {card} / {key}: config must map cuBLASLt fields to ints, got {cfg!r}")
        out[key] = cfg
    return out


def has_entries(device: torch.device) -> bool:
    """Whether this device's card has any measured entry (without one, no linear needs its problem worked out)."""
    return bool(_table(card_name(device), str(TABLE_PATH)))


def choose(problem: Problem, device: torch.device) -> dict[str, int] | None:
    """The measured algorithm configuration of this problem on this device's card, or None (torch)."""
    return _table(card_name(device), str(TABLE_PATH)).get(problem_key(problem))


def merge_into(path: Path, card: str, table: dict, keep: bool = False) -> None:
    """Record one card's measured GEMM table (other cards' entries are kept; this card's too with ``keep``)."""
    write_card_table(path, card, table, keep_others=keep)
    _table.cache_clear()
