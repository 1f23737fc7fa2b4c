"""Per-shape choice of attention implementation for ``Flags(attention="auto")``.

The choice is measured, not guessed: ``python -m speedsd.bench.kernels --attention-table
src/speedsd/data/attention_table.json`` times flash / partial / SDPA (and the Gluon kernel on the shapes
it takes: fp16 d=40/80/160 self-attention on sm_90, measured on fused-QKV views; the one-pass cross kernel on
those with Nk <= 128) on each SD attention shape and records the fastest correct one per card. Shapes are
matched on (heads, Nq, Nk, head dim); the batch only scales the work. A shape the table lacks (another
image size: 640² has 6400 / 1600 / 400 / 100 tokens a level) takes the choice of the nearest measured
shape of its kind (self- or cross-attention) with the same heads and head dim, within NEAREST_FACTOR
in Nq and in Nk; every choice falls back by itself where its kernel cannot take a shape ("gluon" to
SDPA, "cross" to flash). Unknown card, or nothing near: SDPA (PyTorch picks its best backend), except
head dims SDPA's fused backends reject (> 256), which go to our partially fused softmax.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).parent / "data" / "attention_table.json"
# what an entry may name: each is a Flags.attention mode ("gluon" falls back to SDPA where its kernel
# does not apply, e.g. without fused QKV; "cross" to flash)
CHOICES = ("flash", "partial", "sdpa", "gluon", "cross")
NEAREST_FACTOR = 2.0  # how far (either way, in Nq and in Nk) an unmeasured shape borrows a measured one's choice


@functools.lru_cache(maxsize=8)
def _table(card: str, path: str) -> dict[tuple[int, int, int, int], str]:
    p = Path(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    out: dict[tuple[int, int, int, int], str] = {}
    for label, entry in data.get("cards", {}).get(card, {}).items():
        if entry["best"] not in CHOICES:
            raise ValueError(f"{path}: {card} / {label}: unknown attention choice {entry['best']!r}")
        _, h, nq, d = entry["q_shape"]
        out[(h, nq, entry["k_shape"][2], d)] = entry["best"]
    return out


def choose(q_shape: torch.Size, k_shape: torch.Size, dtype: torch.dtype, card: str | None = None) -> str:
    """'flash', 'partial', 'sdpa', 'gluon' or 'cross' ('gluon' and 'cross' only where the table says so) for
    q [B, H, Nq, D], k [B, H, Nk, D]."""
    card = card or torch.cuda.get_device_name()
    _, h, nq, d = q_shape
    nk = k_shape[2]
    table = _table(card, str(TABLE_PATH))
    best = table.get((h, nq, nk, d)) or _nearest(table, h, nq, nk, d)
    if best is not None:
        return best
    return "partial" if d > 256 else "sdpa"


def _nearest(table: dict[tuple[int, int, int, int], str], h: int, nq: int, nk: int, d: int) -> str | None:
    """The choice of the measured shape nearest to (Nq, Nk) in log scale, among those of the same kind
    (self: Nq == Nk, else cross), heads and head dim, each length within NEAREST_FACTOR; None if none."""
    if nq <= 0 or nk <= 0:
        return None
    limit = math.log2(NEAREST_FACTOR)
    found = []
    for (eh, enq, enk, ed), choice in table.items():
        if (eh, ed) != (h, d) or (enq == enk) != (nq == nk):
            continue
        dq, dk = abs(math.log2(nq / enq)), abs(math.log2(nk / enk))
        if dq <= limit and dk <= limit:
            found.append((dq + dk, enq, enk, choice))
    return min(found)[3] if found else None


def write_card_table(path: Path, card: str, table: dict, keep_others: bool = False) -> None:
    """Record one card's measured entries in a per-card JSON, ``{"cards": {card: table}}`` (other cards'
    entries are kept; this card's other entries too with ``keep_others``). The attention and conv tables
    share this format."""
    data = json.loads(path.read_text()) if path.exists() else {}
    cards = data.setdefault("cards", {})
    cards[card] = {**cards.get(card, {}), **table} if keep_others else table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def merge_into(path: Path, card: str, table: dict, keep_others: bool = False) -> None:
    """Record one card's measured attention table (see :func:`write_card_table`)."""
    write_card_table(path, card, table, keep_others)
    _table.cache_clear()
