"""CPU check of conv_halo's index math (the Gluon kernel cannot run here): a torch transcription of the transform
partition (haloed box, four power-of-two pieces, padding masked AFTER the activation, the padded T-stage layout),
the tap windows (base-shifted padded views) and the tile walk (partial tiles at the image edge, clipped stores),
checked against F.conv2d(act(x)) on small odd shapes for every variant's geometry.

    python sim_check.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conv_halo import PADK, VARIANTS, HaloConvConfig  # noqa: E402


def padded_offset(i: int, j: int, k: int, cfg: HaloConvConfig) -> int:
    """PaddedSharedLayout [[BK, PADK], [TW·BK, ROWPAD]] on the [TH, TW, BK] view: lin + pads (what Triton computes)."""
    lin = (i * cfg.tw + j) * cfg.bk + k
    return lin + (lin // cfg.bk) * PADK + (lin // (cfg.tw * cfg.bk)) * cfg.rowpad


def check_layout(cfg: HaloConvConfig) -> None:
    # the padded view is the intended pitch: (i, j, k) -> i·ROWPITCH + j·PIXPITCH + k, for every view element
    for i in range(cfg.th):
        for j in range(cfg.tw):
            for k in (0, cfg.bk - 1):
                assert padded_offset(i, j, k, cfg) == i * cfg.rowpitch + j * cfg.pixpitch + k, (cfg.name, i, j, k)
    # the halo columns fit in the row padding, the box in the stage
    assert cfg.tw * cfg.pixpitch + 2 * cfg.pixpitch <= cfg.rowpitch
    assert (cfg.th + 1) * cfg.rowpitch + (cfg.tw + 1) * cfg.pixpitch + cfg.bk <= cfg.stage_halves
    # bank-conflict freedom of the window loads: 8 consecutive pixels x 4 k-pairs (one warp) hit 32 distinct banks
    banks = {((p * cfg.pixpitch + 2 * q) // 2) % 32 for p in range(8) for q in range(4)}
    assert len(banks) == 32, (cfg.name, len(banks))


def transform(xb, sc, sh, b, oy0, ox0, c0, cfg: HaloConvConfig, silu: bool) -> torch.Tensor:
    """One T stage (flat, fp16 values, NaN where nothing is written): the four pieces of the haloed box."""
    n, h, w, c = xb.shape
    stage = torch.full((cfg.stage_halves,), float("nan"))
    pieces = [(0, 0, cfg.th, cfg.tw), (0, cfg.tw, cfg.th, 2), (cfg.th, 0, 2, cfg.tw), (cfg.th, cfg.tw, 2, 2)]
    for r0, s0, rr, ss in pieces:
        off = r0 * cfg.rowpitch + s0 * cfg.pixpitch  # the piece's view base (constexpr in the kernel)
        for r in range(rr):
            for s in range(ss):
                iy, ix = oy0 - 1 + r0 + r, ox0 - 1 + s0 + s
                ok = 0 <= iy < h and 0 <= ix < w
                v = xb[b, iy, ix, c0 : c0 + cfg.bk].float() if ok else torch.zeros(cfg.bk)
                v = v * sc[b, c0 : c0 + cfg.bk] + sh[b, c0 : c0 + cfg.bk]
                v = torch.where(torch.tensor(ok), v, torch.zeros_like(v))  # padding after the affine
                if silu:
                    v = F.silu(v)
                base = off + r * cfg.rowpitch + s * cfg.pixpitch
                assert torch.isnan(stage[base : base + cfg.bk]).all(), "two pieces write one pixel"
                stage[base : base + cfg.bk] = v.half().float()
    return stage


def window(stage, tap: int, cfg: HaloConvConfig) -> torch.Tensor:
    """A of tap (ky, kx): the padded [TH, TW, BK] view at base ky·ROWPITCH + kx·PIXPITCH -> [TH·TW, BK]."""
    base = (tap // 3) * cfg.rowpitch + (tap % 3) * cfg.pixpitch
    a = torch.empty(cfg.th * cfg.tw, cfg.bk)
    for i in range(cfg.th):
        for j in range(cfg.tw):
            o = base + padded_offset(i, j, 0, cfg)
            a[i * cfg.tw + j] = stage[o : o + cfg.bk]
    assert not torch.isnan(a).any(), "a window reads an unwritten pixel"
    return a


def emulate(x, wt, sc, sh, cfg: HaloConvConfig, silu: bool, grid: int) -> torch.Tensor:
    n, c, h, w = x.shape
    co = wt.shape[0]
    xb = x.permute(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
    w_mat = wt.permute(0, 2, 3, 1).reshape(co, 9 * c).float()  # [Co, 9·C], column tap·C + c
    y = torch.full((n, h, w, co), float("nan"))
    n_th, n_tw, n_nb = -(-h // cfg.th), -(-w // cfg.tw), co // cfg.bn
    num_tiles = n * n_th * n_tw * n_nb
    for pid in range(grid):
        for t in range(pid, num_tiles, grid):  # _tile_coords: nb fastest, then tx, ty, b
            nb, r = t % n_nb, t // n_nb
            tx, r = r % n_tw, r // n_tw
            ty, b = r % n_th, r // n_th
            oy0, ox0, n0 = ty * cfg.th, tx * cfg.tw, nb * cfg.bn
            acc = torch.zeros(cfg.th * cfg.tw, cfg.bn)
            for cb in range(c // cfg.bk):
                stage = transform(xb, sc, sh, b, oy0, ox0, cb * cfg.bk, cfg, silu)
                for tap in range(9):
                    wcol = tap * c + cb * cfg.bk
                    acc += window(stage, tap, cfg) @ w_mat[n0 : n0 + cfg.bn, wcol : wcol + cfg.bk].T
            acc = acc.reshape(cfg.th, cfg.tw, cfg.bn)  # TMA store clips rows/columns past the image
            hh, ww = min(cfg.th, h - oy0), min(cfg.tw, w - ox0)
            y[b, oy0 : oy0 + hh, ox0 : ox0 + ww, n0 : n0 + cfg.bn] = acc[:hh, :ww]
    return y.permute(0, 3, 1, 2)


def main() -> int:
    torch.manual_seed(0)
    # small geometries of each variant (the layout math depends on th, tw, bk; bn only on the tile walk)
    geos = dict(VARIANTS)
    for cfg in geos.values():
        check_layout(cfg)
    print(f"layout: padded views == intended pitch, halo fits, window loads conflict-free for {sorted(geos)}")
    cases = [(HaloConvConfig(name="s8x16", th=8, tw=16, bn=16, bk=32), 2, 64, 13, 21, 32, 3),
             (HaloConvConfig(name="s16", th=16, tw=16, bn=16, bk=32), 1, 32, 19, 17, 16, 2),
             (HaloConvConfig(name="s8x16_bk64", th=8, tw=16, bn=16, bk=64), 1, 64, 9, 16, 16, 1)]  # fmt: skip
    for cfg, n, c, h, w, co, grid in cases:
        check_layout(cfg)
        x = (torch.randn(n, c, h, w) * 2 + 0.5).half()
        wt = (torch.randn(co, c, 3, 3) / (9 * c) ** 0.5).half()
        sc = 0.5 * (1 + 0.2 * torch.randn(n, c))
        sh = -0.25 + 0.1 * torch.randn(n, c)
        for silu in (True, False):
            y = emulate(x, wt, sc, sh, cfg, silu, grid)
            a = x.float() * sc[:, :, None, None] + sh[:, :, None, None]
            a = (F.silu(a) if silu else a).half().float()
            ref = F.conv2d(a, wt.float(), padding=1)
            assert not torch.isnan(y).any(), "unwritten output"
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (cfg.name, silu, err)
            # the padding rule matters here: with act(0-fill) instead of 0 the border would differ
            print(f"{cfg.name:11} x[{n},{c},{h},{w}] -> {co} grid {grid} silu={silu}: rel err {err:.1e} OK")
    print("sim_check OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
