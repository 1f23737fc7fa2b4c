"""GroupNorm plans: which path and block sizes :func:`speedsd.kernels.group_norm.group_norm` runs for a
shape (the paths are described in that module's doc), and the measured :data:`TUNED` table.

``python -m speedsd.bench.kernels_norm_gelu --variants`` times every plan on every SD shape (CUDA-graph
replay) and writes the ``TUNED`` table for this file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from speedsd.kernels.device import sm_count as _sm_count

PATHS = ("auto", "fused", "loop", "split", "rows")
MAX_ROWS_TILE = 49152  # NCHW one-tile (_gn_rows_kernel): padded (RA + RB)·S; 32 warps hold 48 fp32 a thread
MAX_ONE_TILE = 32768  # padded elements of a group block that one program holds in registers (16 warps: ~100 regs)
TILE = 4096  # elements per tile in the streaming (loop / split) kernels


def _channel_block(cpg: int, groups: int, channels_fast: bool, itemsize: int) -> tuple[int, int]:
    """(GB groups per program, BLOCK_C).

    NCHW: one group (its rows are contiguous along S). channels_last: the block of GB·CPG channels is
    each tile row; score = used lanes over all blocks (C / (n_blocks·BLOCK_C)), x 0.75 when a row is
    not a whole number of 16-byte vectors (then loads are narrower), rows of >= 64 B unless GB = G.
    E.g. fp16 C=320: GB=12 (120 ch, BLOCK_C=128, 83 %, 16-B loads); C=1280: GB=3; C=128: GB=8 (100 %).
    """
    p2 = triton.next_power_of_2(cpg)
    if not channels_fast:
        return 1, p2
    best = (-1.0, 1, p2)
    bc = p2
    while bc <= max(p2, 256):
        for gb in range(1, min(bc // cpg, groups) + 1):
            width = gb * cpg
            if triton.next_power_of_2(width) != bc or (width * itemsize < 64 and gb < groups):
                continue
            score = groups * cpg / (triton.cdiv(groups, gb) * bc)
            if (width * itemsize) % 16:
                score *= 0.75
            if score > best[0] + 1e-9:
                best = (score, gb, bc)
        bc *= 2
    return best[1], best[2]


def _row_blocks(cpg: int) -> tuple[int, int]:
    """NCHW one-tile row blocks (RA, RB): RA = largest power of two <= CPG, RB covers the rest (>= 1)."""
    ra = 1 << (cpg.bit_length() - 1)
    return ra, triton.next_power_of_2(max(1, cpg - ra))


@dataclass(frozen=True)
class GroupNormPlan:
    """How :func:`group_norm` runs one shape: path, channel blocking, tiles, launches."""

    path: str  # fused | loop | split
    gb: int  # groups per program
    block_c: int
    block_g: int
    block_s: int
    n_cb: int  # group blocks per sample
    warps: int
    one_tile: bool = False
    chunks: int = 1  # split: chunks of S per group block
    tiles_per_chunk: int = 1
    rows: tuple[int, int] | None = None  # NCHW one-tile: (RA, RB) row blocks of _gn_rows_kernel
    block_k: int = 0  # grouped channels_last split: channels per group padded (tile [BLOCK_S, BLOCK_G, BLOCK_K])
    # rows (channels_last, kernels/group_norm_rows.py): the statistics launch runs chunks x block_s x warps
    # above; the apply launch its own row chunks a sample, rows a tile and warps
    apply: tuple[int, int, int] = (0, 0, 0)

    @property
    def launches(self) -> int:
        return 2 if self.path in ("split", "rows") else 1

    @property
    def grouped(self) -> bool:
        return self.block_k > 0


# Measured best plan per shape, keyed (n, c, s, groups, channels_last, itemsize) -> plan_group_norm
# keyword arguments. Filled from `python -m speedsd.bench.kernels_norm_gelu --variants` (it writes
# group_norm_tuned.py with this dict); consulted by group_norm(path="auto") on CUDA only.
# measured on the NVIDIA H200 (bench/results/group_norm_variants.md: channels_last fp16 SD-1.4 shapes, graph
# replay); only shapes where the best forced plan beat auto by > 3 %
TUNED: dict[tuple[int, int, int, int, bool, int], dict[str, int | str | bool]] = {
    # warps 4: 81.6 -> 71.3 µs (group_norm_split_sweep.md, a later sweep of this split plan)
    (1, 128, 262144, 32, True, 2): {"grouped": False, "path": "split", "programs": 1056, "tile": 8192, "warps": 4},
    (1, 256, 65536, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 256, 262144, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 512, 4096, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 512, 65536, 32, True, 2): {"grouped": False, "path": "split", "programs": 1056, "tile": 8192},
    (2, 320, 1024, 32, True, 2): {"gb": 1, "path": "fused"},
    # rows: gn_rows_sweep_h200.json (2x320: 17.4 -> 14.1 µs, pre-add 18.0 -> 16.7, hand-over 20.4 -> 16.2;
    # 2x960 = the 640+320 concatenation of the up path 39.5 -> 24.0)
    (2, 320, 4096, 32, True, 2): {"path": "rows", "chunks": 64, "tile": 8192, "warps": 4, "apply_chunks": 256},
    (2, 960, 4096, 32, True, 2): {
        "path": "rows",
        "chunks": 64,
        "tile": 8192,
        "warps": 4,
        "apply_chunks": 256,
        "apply_tile": 4096,
    },
    (2, 640, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 640, 1024, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (2, 640, 4096, 32, True, 2): {"grouped": False, "path": "split", "programs": 264, "tile": 8192},
    (2, 1280, 64, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1280, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1280, 1024, 32, True, 2): {"grouped": False, "path": "split"},
    (2, 1920, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1920, 1024, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (2, 2560, 64, 32, True, 2): {"grouped": True, "path": "split", "tile": 4096},
    (2, 2560, 256, 32, True, 2): {"grouped": True, "path": "split", "tile": 4096},
}


def _warps(elements: int, per_thread: int) -> int:
    return max(4, min(32, triton.next_power_of_2(triton.cdiv(elements, 32 * per_thread))))


@functools.lru_cache(maxsize=4096)
def plan_group_norm(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    channels_last: bool,
    itemsize: int,
    sm_count: int = 132,
    path: str = "auto",
    programs: int | None = None,
    tile: int | None = None,
    warps: int | None = None,
    gb: int | None = None,
    grouped: bool | None = None,
    chunks: int | None = None,
    apply_chunks: int | None = None,
    apply_tile: int | None = None,
    apply_warps: int | None = None,
) -> GroupNormPlan:
    """Pick the path and block sizes for x [n, c, s] (s = spatial size). See the module doc.

    Knobs (None = heuristic): ``programs`` split target program count (default 4 per SM); ``tile``
    elements per streaming tile; ``warps``; ``gb`` groups per program (channel blocking);
    ``grouped`` channels_last split over whole pixel rows with 3-D [position, group, channel] tiles.
    ``rows`` (channels_last only): ``chunks`` row chunks a sample, ``tile`` and ``warps`` for the statistics
    launch; ``apply_chunks``, ``apply_tile``, ``apply_warps`` for the apply launch (default: 2 and 8 programs
    an SM, 8192-value tiles, 4 warps).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    cpg = c // num_groups
    channels_fast = channels_last and s > 1
    if path == "rows":
        if not channels_fast:
            raise ValueError("path='rows' needs a channels_last input with more than one position")
        block_c = triton.next_power_of_2(c)

        def rows_per_tile(t: int | None) -> int:
            return min(triton.next_power_of_2(s), max(1, (t or 8192) // block_c))

        stats_chunks = chunks or max(1, 2 * sm_count // n)
        apply = (apply_chunks or max(1, 8 * sm_count // n), rows_per_tile(apply_tile), apply_warps or 4)
        block_g = max(2, triton.next_power_of_2(num_groups))
        return GroupNormPlan(
            "rows", gb=num_groups, block_c=block_c, block_g=block_g, block_s=rows_per_tile(tile), n_cb=1,
            warps=warps or 4, chunks=stats_chunks, apply=apply,
        )  # fmt: skip
    if gb is None:
        gb, block_c = _channel_block(cpg, num_groups, channels_fast, itemsize)
    else:
        gb = max(1, min(gb, num_groups))
        block_c = triton.next_power_of_2(gb * cpg)
    block_g = max(2, triton.next_power_of_2(gb))
    n_cb = triton.cdiv(num_groups, gb)
    s_p2 = triton.next_power_of_2(s)
    common = dict(gb=gb, block_c=block_c, block_g=block_g, n_cb=n_cb)
    rows = _row_blocks(cpg) if not channels_fast and gb == 1 else None
    if rows is not None:
        fits = sum(rows) * s_p2 <= MAX_ROWS_TILE
    else:
        fits = block_c * s_p2 <= (MAX_ONE_TILE if gb == 1 else MAX_ONE_TILE // 2)  # several groups: more live values
    if path == "auto":
        path = "fused" if fits else "loop" if n * n_cb >= 2 * sm_count else "split"
    if path == "fused" and tile is None:
        if not fits:
            raise ValueError(f"path='fused': the group block ({block_c}·{s_p2} padded) does not fit one register tile")
        if rows is not None:  # ~32 fp32 values a thread
            w = warps or _warps(sum(rows) * s_p2, 32)
            return GroupNormPlan("fused", block_s=s_p2, warps=w, one_tile=True, rows=rows, **common)
        w = warps or (16 if block_c * s_p2 > 8192 else 8 if block_c * s_p2 > 2048 else 4)
        return GroupNormPlan("fused", block_s=s_p2, warps=w, one_tile=True, **common)
    if path == "split" and grouped is None:
        grouped = channels_fast  # predicted: whole contiguous pixel rows beat narrow group-block columns
    if path == "split" and grouped and channels_fast:
        return _plan_grouped_split(n, cpg, s, num_groups, sm_count, programs, tile, warps)
    block_s = min(s_p2, max(1, (tile or TILE) // block_c))
    w = warps or (16 if block_s * block_c >= 16384 else 8 if block_s * block_c >= 4096 else 4)
    n_tiles = triton.cdiv(s, block_s)
    if path in ("fused", "loop"):  # "fused" with a forced tile size: the two-sweep single launch
        return GroupNormPlan(path, block_s=block_s, warps=w, tiles_per_chunk=n_tiles, **common)
    target = programs or 4 * sm_count
    per_chunk = max(1, triton.cdiv(n_tiles * n * n_cb, target))  # tiles per chunk
    max_p = max(1, 2048 // block_g)  # every normalize program merges [BLOCK_P, BLOCK_G] partials
    per_chunk = min(n_tiles, max(per_chunk, triton.cdiv(n_tiles, max_p)))
    chunks = triton.cdiv(n_tiles, per_chunk)
    return GroupNormPlan("split", block_s=block_s, warps=w, chunks=chunks, tiles_per_chunk=per_chunk, **common)


def _plan_grouped_split(
    n: int, cpg: int, s: int, groups: int, sm_count: int, programs: int | None, tile: int | None, warps: int | None
) -> GroupNormPlan:
    block_g = max(2, triton.next_power_of_2(groups))
    block_k = triton.next_power_of_2(cpg)
    row = block_g * block_k  # padded channels of one pixel row
    # default tile: >= 8 pixel rows and >= 4K values, at most 16K values
    rows_per_tile = (tile or min(16384, max(4096, 8 * row))) // row
    block_s = min(triton.next_power_of_2(s), max(1, rows_per_tile))
    n_tiles = triton.cdiv(s, block_s)
    per_chunk = max(1, triton.cdiv(n_tiles * n, programs or 2 * sm_count))
    max_p = max(1, 8192 // block_g)  # every normalize program merges [BLOCK_P, BLOCK_G] partials
    per_chunk = min(n_tiles, max(per_chunk, triton.cdiv(n_tiles, max_p)))
    chunks = triton.cdiv(n_tiles, per_chunk)
    w = warps or (16 if block_s * row >= 16384 else 8 if block_s * row >= 4096 else 4)
    w = max(w, min(16, triton.next_power_of_2(triton.cdiv(triton.next_power_of_2(chunks) * block_g, 32 * 32))))
    return GroupNormPlan(
        "split", gb=groups, block_c=row, block_g=block_g, block_s=block_s, n_cb=1, warps=w, chunks=chunks,
        tiles_per_chunk=per_chunk, block_k=block_k,
    )  # fmt: skip


def plan_for(n: int, c: int, s: int, groups: int, cl: bool, itemsize: int, device: torch.device) -> GroupNormPlan:
    """The plan ``group_norm(path="auto")`` runs: the measured :data:`TUNED` entry on CUDA, else the heuristic."""
    tuned = TUNED.get((n, c, s, groups, cl, itemsize)) if device.type == "cuda" else None
    knobs = dict(tuned) if tuned else {}
    path = str(knobs.pop("path", "auto"))
    return plan_group_norm(n, c, s, groups, cl, itemsize, _sm_count(device), path, **knobs)  # type: ignore[arg-type]
