"""CPU checks of conv_gluon's kernel logic without a GPU (the Gluon code itself cannot run here).

1. index map: a torch transcription of the kernel's schedule (persistent tile walk, _tile_coords, TMA boxes with
   zero fill, channel-block-major K loop, weight columns tap·C + c0, the prologue's row mask, clipped TMA store)
   must equal F.conv2d(act(x)) on small odd shapes (partial tiles, batch 2).
2. ring protocol: the producer / consumer mbarrier protocol of _load_partition / _mma_partition (phase parities,
   the look-ahead of the register-A prologue, one release per step, the wait(1) wgmma window) run under a random
   scheduler with TMA completions at random later times: no deadlock, every read sees the step it expects, no
   slot is refilled while a wgmma that reads it is in flight.

    python sim_check.py
"""

from __future__ import annotations

import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conv_gluon import conv3x3_gluon_ref  # noqa: E402


# ----------------------------------------------------------------------------------------------- 1. index map
def tile_coords(t, n_th, n_tw, n_nb, th, tw, bn):  # same arithmetic as _tile_coords
    nb = t % n_nb
    r = t // n_nb
    tx = r % n_tw
    r = r // n_tw
    ty = r % n_th
    return r // n_th, ty * th, tx * tw, nb * bn


def tma_box(x_nhwc, b, y0, x0, c0, th, tw, bk):
    """x[b, y0 : y0 + th, x0 : x0 + tw, c0 : c0 + bk] with zeros outside the tensor (TMA tiled-mode fill)."""
    n, h, w, c = x_nhwc.shape
    out = torch.zeros(th, tw, bk, dtype=x_nhwc.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + th, h), min(x0 + tw, w)
    if ys < ye and xs < xe and 0 <= b < n:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = x_nhwc[b, ys:ye, xs:xe, c0 : c0 + bk]
    return out


def emulate(x, wt, scale, shift, silu, th, tw, bn, bk, grid):
    n, c, h, w = x.shape
    co = wt.shape[0]
    x_nhwc = x.permute(0, 2, 3, 1).float()  # [N, C, H, W] -> [N, H, W, C]
    w_mat = wt.permute(0, 2, 3, 1).reshape(co, 9 * c).float()  # [Co, 9·C], column tap·C + c
    y = torch.full((n, h, w, co), float("nan"))
    n_th, n_tw, n_nb = -(-h // th), -(-w // tw), co // bn
    num_tiles = n * n_th * n_tw * n_nb
    rows = torch.arange(th * tw)
    for pid in range(grid):
        for t in range(pid, num_tiles, grid):
            b, oy0, ox0, n0 = tile_coords(t, n_th, n_tw, n_nb, th, tw, bn)
            row_y, row_x = oy0 - 1 + rows // tw, ox0 - 1 + rows % tw
            acc = torch.zeros(th * tw, bn)
            for cb in range(c // bk):
                c0 = cb * bk
                for tap in range(9):
                    ky, kx = tap // 3, tap % 3
                    a = tma_box(x_nhwc, b, oy0 + ky - 1, ox0 + kx - 1, c0, th, tw, bk).reshape(th * tw, bk)
                    if scale is not None or silu:
                        if scale is not None:
                            a = a * scale[b, c0 : c0 + bk] + shift[b, c0 : c0 + bk]
                        iy, ix = row_y + ky, row_x + kx
                        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                        a = torch.where(ok[:, None], a, 0.0)
                        if silu:
                            a = F.silu(a)
                    acc += a @ w_mat[n0 : n0 + bn, tap * c + c0 : tap * c + c0 + bk].T
            ye, xe = min(oy0 + th, h), min(ox0 + tw, w)  # the TMA store clips the tile at the image edge
            y[b, oy0:ye, ox0:xe, n0 : n0 + bn] = acc.reshape(th, tw, bn)[: ye - oy0, : xe - ox0]
    return y.permute(0, 3, 1, 2)


def check_index_map() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [  # (N, C, H, W, Co, TH, TW, BN, BK, grid)
        (2, 64, 12, 20, 32, 8, 16, 16, 32, 3),
        (1, 64, 16, 16, 64, 16, 16, 32, 32, 1),
        (2, 96, 9, 7, 16, 8, 16, 16, 32, 5),
    ]
    for n, c, h, w, co, th, tw, bn, bk, grid in cases:
        x = torch.randn(n, c, h, w, generator=g) * 2 + 0.5
        wt = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
        scale = 0.5 + 0.1 * torch.randn(n, c, generator=g)
        shift = -0.25 + 0.1 * torch.randn(n, c, generator=g)
        for sc, sh, silu in ((None, None, False), (scale, shift, True), (scale, shift, False), (None, None, True)):
            got = emulate(x, wt, sc, sh, silu, th, tw, bn, bk, grid)
            ref = conv3x3_gluon_ref(x, wt, scale=sc, shift=sh, silu=silu)
            assert torch.isfinite(got).all(), "unwritten outputs"
            err = float((got - ref).abs().max())
            assert err < 1e-3, (n, c, h, w, co, th, tw, silu, sc is not None, err)
    print(f"index map: {len(cases)} shapes x 4 prologue modes match F.conv2d(act(x))")


# ----------------------------------------------------------------------------------------------- 2. protocol
class MBarrier:
    """count = 1 mbarrier: a phase completes when its one arrival came and its expected TMA bytes landed.
    wait(parity P) passes once the phase of parity P completed, i.e. while the current phase's parity != P."""

    def __init__(self) -> None:
        self.completed = 0
        self.arrived = 0
        self.tx = 0

    def arrive(self, tx: int = 0) -> None:
        self.arrived += 1
        self.tx += tx
        assert self.arrived <= 1, "two arrivals in one phase (count = 1)"
        self._maybe_complete()

    def complete_tx(self, n: int) -> None:
        self.tx -= n
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.arrived == 1 and self.tx == 0:
            self.completed += 1
            self.arrived = 0

    def passes(self, parity: int) -> bool:
        return (self.completed & 1) != parity


def producer(st, stages, tiles, kc):
    it = 0
    for _t in range(tiles):
        for _cb in range(kc):
            for _tap in range(9):
                s = it % stages
                while not st["empty"][s].passes(((it // stages) & 1) ^ 1):
                    yield
                st["ready"][s].arrive(tx=2)  # expect(A + B bytes)
                st["tma"].append((s, it))  # lands later: writes slot s, completes 2 tx bytes
                it += 1
                yield


def consumer(st, stages, tiles, kc, prologue):
    slot, ready, empty = st["slot"], st["ready"], st["empty"]
    inflight: list[tuple[int, int]] = []  # wgmmas issued, not retired: (slot, step)

    def wait_ready(i):
        while not ready[i % stages].passes((i // stages) & 1):
            yield
        assert slot[i % stages] == i, f"slot {i % stages} holds step {slot[i % stages]}, expected {i}"

    def retire(keep):
        while len(inflight) > keep:
            s, i = inflight.pop(0)
            assert slot[s] == i, f"slot {s} refilled (step {slot[s]}) while wgmma of step {i} read it"

    it = 0
    for _t in range(tiles):
        if prologue:
            yield from wait_ready(it)  # a_cur = act(A of step it)
        for cb in range(kc):
            for tap in range(9):
                s = it % stages
                if prologue:
                    if tap < 8 or cb + 1 < kc:
                        yield from wait_ready(it + 1)  # a_nxt, built before wgmma(it) is issued
                else:
                    yield from wait_ready(it)
                inflight.append((s, it))  # wgmma(it) reads slot s (B, and A when not from registers)
                yield
                retire(1)  # warpgroup_mma_wait(1)
                if tap > 0 or cb > 0:  # _release_prev
                    empty[(it + stages - 1) % stages].arrive()
                it += 1
                yield
        retire(0)  # warpgroup_mma_wait(0)
        empty[(it + stages - 1) % stages].arrive()
        yield


def run_protocol(stages, tiles, kc, prologue, seed) -> int:
    rng = random.Random(seed)
    st = dict(slot=[-1] * stages, ready=[MBarrier() for _ in range(stages)],
              empty=[MBarrier() for _ in range(stages)], tma=[])  # fmt: skip
    actors = {"p": producer(st, stages, tiles, kc), "c": consumer(st, stages, tiles, kc, prologue)}
    ticks = 0
    while actors or st["tma"]:
        ticks += 1
        assert ticks < 200000, "no progress (deadlock?)"
        choices = list(actors) + (["tma"] if st["tma"] else [])
        who = rng.choice(choices)
        if who == "tma":
            s, i = st["tma"].pop(rng.randrange(len(st["tma"])))
            st["slot"][s] = i
            st["ready"][s].complete_tx(2)
            continue
        try:
            next(actors[who])
        except StopIteration:
            del actors[who]
    assert all(b.tx == 0 and b.arrived == 0 for b in st["ready"]), "ready barriers left mid-phase"
    return ticks


def check_protocol() -> None:
    runs = 0
    for stages in (3, 4, 6, 8):
        for kc in (1, 2, 5):
            for tiles in (1, 3):
                for prologue in (False, True):
                    for seed in range(6):
                        run_protocol(stages, tiles, kc, prologue, seed)
                        runs += 1
    print(f"ring protocol: {runs} randomized runs (stages 3-8, 1-5 channel blocks, 1-3 tiles, +-prologue): "
          f"no deadlock, no stale read, no slot refilled under an in-flight wgmma")  # fmt: skip


if __name__ == "__main__":
    check_index_map()
    check_protocol()
