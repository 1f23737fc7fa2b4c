"""bench.kernels_conv: the VAE and UNet shapes it measures and how it picks the Gluon conv's variant or split.

The search and the table entries it records are in tests/test_conv_table.py; the measurements themselves
run on the GPU (``python -m speedsd.bench.kernels_conv``).
"""

from __future__ import annotations

import collections

import pytest
import torch

from interp_bounds import needs_interpreter
from speedsd import ops
from speedsd.bench import kernels_conv as kc
from speedsd.models.unet import UNET_PRESETS, UNet2DCondition
from speedsd.models.vae import AutoencoderKL, VAEConfig


def test_vae_shapes_are_the_decoders_3x3_convs(monkeypatch):
    """VAE_SHAPES (shape, Co, calls per decode) are the SD decoder's stride-1 3x3 convs with >= 64 channels
    in and out (conv_in's 4 and conv_out's 3 channels are the implicit GEMM's / cuDNN's), counted on a 512²
    decode on the meta device; the upsamplers' convs run as sub-pixel phase convs (not counted)."""
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig()).half()
    calls: collections.Counter = collections.Counter()
    real = ops.conv2d_op

    def record(x, conv, with_bias=True):
        if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and min(x.shape[1], conv.out_channels) >= 64:
            calls[(tuple(x.shape), conv.out_channels)] += 1
        return real(x, conv, with_bias)

    def subpixel(x, conv, next_groups=None):  # the phase convs' output, without running them
        return x.new_empty(x.shape[0], conv.out_channels, 2 * x.shape[2], 2 * x.shape[3])

    monkeypatch.setattr(ops, "conv2d_op", record)
    monkeypatch.setattr(ops, "upsample_conv_op", subpixel)
    with torch.inference_mode():
        out = vae.decoder(torch.empty(1, 4, 64, 64, device="meta", dtype=torch.float16))
    assert out.shape == (1, 3, 512, 512)
    want = {(shape, n): calls for _, shape, n, k, stride, pad, calls in kc.VAE_SHAPES}
    assert all(k == 3 and stride == 1 and pad == 1 for _, _, _, k, stride, pad, _ in kc.VAE_SHAPES)
    assert dict(calls) == want


@pytest.mark.parametrize("preset, latent, text_dim", [("sd1", 64, 768), ("sd1", 96, 768), ("sd2", 96, 1024)])
def test_unet_gluon_shapes_are_the_unets_stride1_convs(monkeypatch, preset, latent, text_dim):
    """unet_gluon_shapes(latent) (shape, Co, calls per step) are the UNet's stride-1 3x3 convs at its four levels
    (batch 2: classifier-free guidance; SD-1 at 64 = UNET_GLUON_SHAPES, SD-1 and SD-2 at 96, 768² images),
    counted on the meta device with the upsamplers' convs as sub-pixel phase convs (not counted); at 64 the base
    rows' 16² 1280->1280 count agrees."""
    with torch.device("meta"):
        unet = UNet2DCondition(UNET_PRESETS[preset]).half()
    calls: collections.Counter = collections.Counter()
    real = ops.conv2d_op

    def record(x, conv, with_bias=True):
        inner = x.shape[1] > 4 < conv.out_channels  # (not conv_in / conv_out)
        sides = (latent, latent // 2, latent // 4, latent // 8)
        if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and x.shape[-1] in sides and inner:
            calls[(tuple(x.shape), conv.out_channels)] += 1
        return real(x, conv, with_bias)

    def subpixel(x, conv, next_groups=None):
        return x.new_empty(x.shape[0], conv.out_channels, 2 * x.shape[2], 2 * x.shape[3])

    monkeypatch.setattr(ops, "conv2d_op", record)
    monkeypatch.setattr(ops, "upsample_conv_op", subpixel)
    sample = torch.empty(2, 4, latent, latent, device="meta", dtype=torch.float16)
    text = torch.empty(2, 77, text_dim, device="meta", dtype=torch.float16)
    with torch.inference_mode(), ops.using(ops.Flags(channels_last=True)):
        unet(sample, torch.tensor([10.0, 10.0], device="meta"), text)
    rows = kc.unet_gluon_shapes(latent)
    assert all((k, s, p) == (3, 1, 1) and f"{shape[2]}²" in label for label, shape, _, k, s, p, _ in rows)
    assert dict(calls) == {(shape, n): c for _, shape, n, _, _, _, c in rows}
    if latent == 64:
        assert rows == kc.UNET_GLUON_SHAPES
        base = {(shape, n): c for _, shape, n, k, s, _, c in kc.SHAPES if (k, s) == (3, 1) and shape[1] > 320}
        assert all(base[key] == calls[key] for key in base)  # the base rows' counts agree


def test_unet_gluon_shapes_need_a_multiple_of_8():
    for bad in (60, 4, 0):
        with pytest.raises(ValueError, match="multiple of 8"):
            kc.unet_gluon_shapes(bad)


@pytest.mark.parametrize("shape, co", [((2, 640, 32, 32), 640), ((2, 1280, 16, 16), 1280), ((2, 1280, 8, 8), 1280),
                                       ((2, 320, 32, 32), 640), ((2, 64, 16, 16), 96),
                                       ((2, 320, 64, 64), 320)])  # fmt: skip
def test_gluon_split_configs(shape, co):
    """Valid configs only: tiles of bn + bn1 channels that divide Co (two images a tile only where an image fits
    one tile), K splits that leave every split a K step and fill at most 2.2 waves of 132 SMs; each fitting tile
    also without a split."""
    n, c, h, w = shape
    cfgs = kc.gluon_split_configs(shape, co)
    tiles = {(t.th, t.tw, t.bn, t.bn1, t.consumers, t.tb) for t in cfgs}
    fits = {t for t in kc.GLUON_TILES if co % (t[2] + t[3]) == 0 and (t[5] == 1 or (h <= t[0] and w <= t[1]))}
    assert tiles == fits
    for cfg in cfgs:
        assert cfg.persistent and cfg.bk == 64 and cfg.smem_bytes() <= kc.cg.SMEM_LIMIT and cfg.split <= 9 * c // 64
        units = n // cfg.tb * -(-h // cfg.th) * -(-w // cfg.tw) * (co // cfg.width) * cfg.split
        assert cfg.split == 1 or units <= 2.2 * 132
    assert all(any(c.split == 1 and (c.th, c.tw, c.bn, c.bn1, c.consumers, c.tb) == t for c in cfgs) for t in tiles)
    if shape == (2, 1280, 16, 16):  # 40 tiles of 8 x 16 px x 128 channels: 2, 3, 4, 5 and 6 splits
        assert sorted(c.split for c in cfgs if (c.th, c.tw, c.bn, c.bn1) == (8, 16, 128, 0)) == [1, 2, 3, 4, 5, 6]
    if co % 320 == 0:  # 320 = 256 + 64 = 2 x (128 + 32): the bn1 tiles
        assert {(c.bn, c.bn1) for c in cfgs} >= {(256, 64), (128, 32)}
    if shape == (2, 1280, 8, 8):  # both images a tile: 10 tiles, up to 16 splits (20 channel blocks)
        assert sorted(c.split for c in cfgs if c.tb == 2 and c.consumers == 2) == kc.GLUON_SPLITS
    assert len({str(c) for c in cfgs}) == len(cfgs)


@pytest.fixture
def fake_variants(monkeypatch):
    """Variant outputs and times faked on CPU: 'ws' leaves its output unwritten (NaN), 'ws_np' is off by 1%,
    'ws2' and 'ws2_np' are exact; times by config."""
    times = {}

    def conv(x, w, bias, cfg, out=None):
        y = torch.nn.functional.conv2d(x.float(), w.float(), padding=1)
        name = {str(kc.cg.variant(n, w.shape[0])): n for n in kc.cg.VARIANTS}[str(cfg)]
        if name == "ws":
            return out
        y = y * 1.01 if name == "ws_np" else y
        return y if out is None else out.copy_(y)

    def time_conv(fn, weights, smoke):
        fn(weights[0])
        return times[str(conv.last)]

    def record(x, w, bias, cfg, out=None):
        conv.last = cfg
        return conv(x, w, bias, cfg, out)

    monkeypatch.setattr(kc.cg, "conv3x3_gluon", record)
    monkeypatch.setattr(kc, "_time_conv", time_conv)
    return times


@pytest.mark.parametrize("fastest", ["ws", "ws_np", "ws2", "ws2_np"])
def test_bench_gluon_picks_the_fastest_correct_variant(fake_variants, fastest):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 64, 6, 8, generator=g) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 64, 3, 3, generator=g) / 24).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).float()
    torch_err = kc._rel(torch.nn.functional.conv2d(x.half().float(), w.half().float(), padding=1), ref)
    cfgs = {n: str(kc.cg.variant(n, 256)) for n in kc.cg.VARIANTS}
    for n, key in cfgs.items():
        fake_variants[key] = 0.1 if n == fastest else {"ws": 0.2, "ws_np": 0.3, "ws2": 0.4, "ws2_np": 0.5}[n]
    res = kc.bench_gluon(x, [w], ref, torch_err)
    assert set(res["gluon_all"]) == set(cfgs.values())
    assert [res["gluon_all"][cfgs[n]]["ok"] for n in kc.cg.VARIANTS] == [False, False, True, True]
    want = fastest if fastest.startswith("ws2") else "ws2"  # wrong variants never win
    assert res["gluon_ok"] and res["gluon_config"] == cfgs[want] and res["gluon_ms"] == fake_variants[cfgs[want]]


def test_no_gluon_off_sm90():
    """On this CPU (no sm_90 GPU) a Gluon row is measured like any other: no Gluon keys."""
    r = kc.bench_shape(kc.SMOKE[0], "cpu", True, 0.0, kc.SPLITS, gluon="splits")
    assert "gluon_config" not in r and "gluon_ok" not in r


def test_tma_candidates_only_where_the_kernel_takes_the_conv():
    """The search tries TMA-operand configs on the 8² level's 3x3 stride-1 convs (whole-row tiles: 2 images of
    8x8 or 8 rows), each accepted by the kernel's own check, and none on a stride-2 conv or an NCHW input."""
    cl = torch.channels_last
    x = torch.empty(2, 1280, 8, 8, dtype=torch.float16).contiguous(memory_format=cl)
    w = torch.empty(1280, 1280, 3, 3, dtype=torch.float16).contiguous(memory_format=cl)
    cands = kc._tma_configs(x, w, 1280, 1, 1)
    assert cands and all(c.tma and kc.ci.tma_problem(x, w, 1, 1, c) is None for c in cands)
    assert {c.block_m for c in cands} == {64, 128} and all(c.split > 1 for c in cands)
    assert kc._tma_configs(x, w, 1280, 2, 1) == []
    assert kc._tma_configs(x.contiguous(), w, 1280, 1, 1) == []


@needs_interpreter  # the smoke row's kernels on CPU tensors
def test_unsearched_rows_retime_the_tables_implicit_gemm_config(monkeypatch):
    """A --shapes unet row does not search the implicit GEMM, but re-times the config the card's table names
    (where it names one) in the same run, so its winner is chosen among numbers of one run."""
    named = kc.IgemmConfig(32, 16, 16, 2, 4, 2)
    asked = []
    monkeypatch.setattr(kc.conv_table, "choose", lambda *a: asked.append(a[:5]) or named)
    r = kc.bench_shape(kc.SMOKE[0], "cpu", True, 0.0, kc.SPLITS, gluon="splits", igemm=False)
    assert asked == [((2, 32, 4, 4), 48, 3, 1, 1)]
    assert r["best_config"] == named.key() and r["configs_timed"] == 1 and r["ok"]
    monkeypatch.setattr(kc.conv_table, "choose", lambda *a: None)  # no table entry: nothing timed, nothing wrong
    r = kc.bench_shape(kc.SMOKE[0], "cpu", True, 0.0, kc.SPLITS, gluon="splits", igemm=False)
    assert r["best_config"] is None and r["configs_timed"] == 0 and r["ok"]
