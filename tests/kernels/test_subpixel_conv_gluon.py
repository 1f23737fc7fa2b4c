"""The Gluon conv's sub-pixel mode (kernels/subpixel_conv_gluon.py, TAPS = 4): nearest 2x upsampling + 3x3 conv as
one launch of the four phases' 2x2 convs, each tile stored into its interleaved output positions.

CPU: the launcher's checks, and a torch model of the kernel's unit walk run on the launcher's own descriptors
(every unit (tile, phase, channel block) once, its four taps' boxes, the phase's weight rows, the 5-D store into
y [N, H, 2, W, 2·Co]; GroupNorm partials per (tile, phase, warp)) against upsample + conv in fp32, on real and odd
shapes (edge tiles, bn + bn1 tiles, two images a tile); sm_90 AOT compiles (no spills, 5-D TMA stores);
ops.upsample_conv_op's routing by the conv table. GPU (sm_90): the kernel against fp64 upsample + conv (<= 2x the
engine's cuDNN + interleave fp16 error), NaN-poisoned, and its statistics against fp64 ones of its own output.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gluon_aot import ptxas_log, require_gluon_aot, run_compile_child, spills
from interp_bounds import needs_interpreter
from speedsd import conv_table, ops
from speedsd.kernels import conv_gluon as cg
from speedsd.kernels import gn_tile_stats as ts
from speedsd.kernels.bias_add import GN_STATS_ATTR
from speedsd.kernels.group_norm import group_norm_ref
from speedsd.kernels.subpixel_conv import subpixel_upsample_conv, subpixel_upsample_conv_ref
from speedsd.kernels.subpixel_conv_gluon import subpixel_conv_gluon, subpixel_conv_gluon_supported
from speedsd.kernels.subpixel_weight import subpixel_weight_ref

CL = torch.channels_last


def make(n, c, h, w, co, device="cpu", seed=0):
    """x ~ 2·N + 0.5, W ~ N(0, 1/(9C)) + 0.01 and its fold W4, bias ~ N(0.3, 1); fp16 channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).half().to(device).contiguous(memory_format=CL)
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5 + 0.01).half().to(device).contiguous(memory_format=CL)
    w4 = subpixel_weight_ref(wt).contiguous(memory_format=CL)
    bias = (torch.randn(co, generator=g) + 0.3).half().to(device)
    return x, wt, w4, bias


def subpixel_stats_ref(y, groups, cfg, per_channel=False):
    """What the sub-pixel epilogue writes: per (tile, phase, warp) part ((ty·n_tw + tx)·4 + ph)·warps + w, the
    tile statistics of phase (a, c_)'s image y[:, :, a::2, c_::2] (fp64, as fp32); per channel: [3, N, P, C]."""
    g = y.shape[1] if per_channel else groups
    per_phase = [ts.tile_stats_ref(y[:, :, a::2, c::2], g, cfg.th, cfg.tw, cfg.warps) for a in (0, 1) for c in (0, 1)]
    n, parts = y.shape[0], per_phase[0].shape[3]
    # 4 x [3, N, G, T·warps] -> [3, N, G, T, 4, warps] -> [3, N, G, T·4·warps]
    part = torch.stack([p.view(3, n, g, parts // cfg.warps, cfg.warps) for p in per_phase], dim=4)
    part = part.reshape(3, n, g, 4 * parts)
    return part.permute(0, 1, 3, 2).contiguous() if per_channel else part


def _emulate(x, weight4, bias, y, cfg, sms, part=None):
    """The kernel's work on the launcher's descriptors: unit t = ((((b·n_th + ty)·n_tw + tx)·split + sp)·4 + ph)·n_nb
    + nb; its K steps ks = 4·cb + tap read x's [TB, TH, TW, BK] box at (oy0 + a + ky − 1, ox0 + c_ + kx − 1)
    (zeros outside, as TMA fills) and W4m's rows ph·Co + n0 .., columns tap·C + c0 ..; the fp32 sum + bias goes
    to y5[b, oy0 :, a, ox0 :, c_·Co + n0 :] clipped at H, W ((a, c_) = divmod(ph, 2), (ky, kx) = divmod(tap, 2))."""
    grid, args, const = cg._launch_args(x, weight4, bias, y, cfg, sms, part=part, taps=4)
    xd, wd, yd, _, _, _, w1d, y1d, bias_ptr, part_ptr, _, c, h, w, co, n_img, n_th, n_tw, n_split, n_nb, units = args
    assert const["TAPS"] == 4 and const["BN1"] == cfg.bn1 and not const["HAS_RES"]
    assert const["STATS"] == (part is not None) and (part is None or part_ptr is part)
    assert xd.block_shape == [cfg.tb, cfg.th, cfg.tw, cfg.bk] and wd.block_shape == [cfg.bn, cfg.bk]
    assert yd.block_shape == [cfg.tb, cfg.th, 1, cfg.tw, cfg.bn // cfg.epi_split]
    if cfg.bn1:
        assert w1d.block_shape == [cfg.bn1, cfg.bk] and y1d.block_shape == [cfg.tb, cfg.th, 1, cfg.tw, cfg.bn1]
    x_nhwc, w_mat, y5 = xd.base, wd.base, yd.base
    assert tuple(y5.shape) == (n_img, h, 2, w, 2 * co) and y5.data_ptr() == y.data_ptr()
    assert tuple(w_mat.shape) == (4 * co, 4 * c) and n_split == 1
    width = cfg.width
    xp = F.pad(x_nhwc.float(), (0, 0, 1, cfg.tw + 1, 1, cfg.th + 1))  # zero fill around [H, W]
    seen = []
    for p in range(grid[0]):
        for t in range(p, units, grid[0]) if cfg.persistent else [p]:
            seen.append(t)
            nb, r = t % n_nb, t // n_nb
            ph, r = r % 4, r // 4
            r //= n_split
            tx, r = r % n_tw, r // n_tw
            ty, b = r % n_th, r // n_th * cfg.tb
            oy0, ox0, n0 = ty * cfg.th, tx * cfg.tw, nb * width
            a, c_ = divmod(ph, 2)
            acc = torch.zeros(cfg.bm, width)
            for ks in range(4 * (c // cfg.bk)):
                cb, tap = divmod(ks, 4)
                ky, kx = divmod(tap, 2)
                c0 = cb * cfg.bk
                rows = slice(oy0 + a + ky, oy0 + a + ky + cfg.th)  # (+ 1 in the padded xp)
                cols = slice(ox0 + c_ + kx, ox0 + c_ + kx + cfg.tw)
                box = xp[b : b + cfg.tb, rows, cols, c0 : c0 + cfg.bk].reshape(cfg.bm, cfg.bk)
                blk = w_mat[ph * co + n0 : ph * co + n0 + width, tap * c + c0 : tap * c + c0 + cfg.bk].float()
                acc += box @ blk.T
            if bias is not None:
                acc += bias_ptr[n0 : n0 + width].float()
            tile = acc.to(y.dtype).view(cfg.tb, cfg.th, cfg.tw, width)[:, : h - oy0, : w - ox0]  # clipped
            y5[b : b + cfg.tb, oy0 : oy0 + cfg.th, a, ox0 : ox0 + cfg.tw, c_ * co + n0 : c_ * co + n0 + width] = tile
    assert sorted(seen) == list(range(units)), "every unit exactly once"
    assert units == n_img // cfg.tb * n_th * n_tw * 4 * n_nb
    if part is not None:  # the statistics of the stored values (the kernel's own math: the GPU test)
        per_channel = const["CPG"] == 0
        assert part.shape[2 if per_channel else 3] == n_th * n_tw * 4 * cfg.warps
        part.copy_(subpixel_stats_ref(y, 1 if per_channel else part.shape[2], cfg, per_channel))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an sm_90 device with 3 SMs: the launch runs the torch model of the kernel's unit walk."""
    calls = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None, taps=9):
        assert taps == 4 and residual is None
        calls.append((cfg, part is not None))
        _emulate(x, weight, bias, y, cfg, sms=3, part=part)

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    return calls


CASES = [  # (N, C, H, W, Co), config, bias
    pytest.param((2, 128, 16, 16, 320), "g8x8n256+64k64s4c1e2p", True, id="unet16-like-bn256+64"),
    pytest.param((2, 64, 8, 8, 320), "g8x8n128+32k64s5c1e1p", True, id="bn128+32-two-tiles-across-Co"),
    pytest.param((1, 64, 9, 13, 128), "g8x8n128k64s4c1e1p", True, id="edge-tiles-8x8"),
    pytest.param((2, 64, 5, 7, 128), "g8x8b2n128k64s4c2e1p", False, id="tb2-image-smaller-than-tile-no-bias"),
    pytest.param((1, 128, 12, 20, 256), "g8x16n256k64s4c2e2", True, id="8x16-nonpersistent-2-slabs"),
]


@pytest.mark.parametrize("shape, key, with_bias", CASES)
def test_launcher_against_the_unit_model(fake_gpu, shape, key, with_bias):
    n, c, h, w, co = shape
    x, wt, w4, bias = make(n, c, h, w, co)
    b = bias if with_bias else None
    out = torch.full((n, co, 2 * h, 2 * w), float("nan")).half().contiguous(memory_format=CL)
    y = subpixel_conv_gluon(x, w4, b, key, out=out)
    assert y is out and not y.isnan().any(), "every output position written"
    want = subpixel_upsample_conv_ref(x.float(), wt.float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-3)
    assert fake_gpu == [(cg.GluonConvConfig.parse(key), False)]


@pytest.mark.parametrize(
    "shape, key", [((1, 64, 9, 13, 128), "g8x8n128k64s4c1e1p"), ((2, 64, 8, 8, 320), "g8x8n128+32k64s5c1e1p")],
    ids=["edge-tiles-groups-of-4", "bn128+32-per-channel-groups-of-10"],
)
def test_statistics_hand_over(fake_gpu, shape, key):
    """stats_groups: one part per (tile, phase, warp), handed over on y; GroupNorm from them is GroupNorm of y."""
    n, c, h, w, co = shape
    x, _, w4, bias = make(n, c, h, w, co)
    y = subpixel_conv_gluon(x, w4, bias, key, stats_groups=32)
    stats = getattr(y, GN_STATS_ATTR)
    assert isinstance(stats, ts.TileStats) and stats.per_channel == ("+" in key) and fake_gpu[-1][1]
    gw, gb = torch.rand(co).half() + 0.5, torch.rand(co).half() - 0.5
    scale, shift = stats.scale_shift(y, 32, gw, gb, 1e-6)
    got = F.silu(y.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None])
    want = group_norm_ref(y.double(), 32, gw.double(), gb.double(), 1e-6, silu=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


BAD = [
    pytest.param(lambda x, w4, b: (x, w4[:, :, :1], b), "weight4", id="1x2-weight"),
    pytest.param(lambda x, w4, b: (x, w4[:-1], b), "weight4", id="rows-not-4-phases"),
    pytest.param(lambda x, w4, b: (x.float(), w4.float(), b), "fp16", id="fp32"),
    pytest.param(lambda x, w4, b: (x.contiguous(), w4, b), "channels_last x", id="nchw-x"),
    pytest.param(lambda x, w4, b: (x, w4, torch.ones(64).half()), "bias must be", id="bias-length"),
    pytest.param(lambda x, w4, b: (x[:, :32], w4[:, :32], b), "multiple of 64", id="C32"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_clear_errors(fake_gpu, args, match):
    x, _, w4, bias = make(1, 64, 8, 8, 128)
    x, w4, bias = args(x, w4, bias)
    with pytest.raises(ValueError, match=match):
        subpixel_conv_gluon(x, w4, bias, "g8x8n128k64s4c1e1p")
    assert not subpixel_conv_gluon_supported(x, w4, bias, "g8x8n128k64s4c1e1p")


def test_refusals(fake_gpu):
    x, _, w4, bias = make(1, 64, 8, 8, 128)
    with pytest.raises(ValueError, match="no K split"):
        subpixel_conv_gluon(x, w4, bias, "g8x8n128k64s4c1e1sk2p")
    with pytest.raises(ValueError, match="out must be"):
        subpixel_conv_gluon(x, w4, bias, "g8x8n128k64s4c1e1p", out=torch.empty(1, 128, 16, 16).half())
    with pytest.raises(ValueError, match="per image"):
        subpixel_conv_gluon(make(2, 64, 8, 8, 128)[0], w4, bias, "g8x8b2n128k64s4c2e1p", stats_groups=32)
    with pytest.raises(ValueError, match="stats_groups=3"):
        subpixel_conv_gluon(x, w4, bias, "g8x8n128k64s4c1e1p", stats_groups=3)
    with pytest.raises(ValueError, match="sub-pixel conv writes"):
        cg._launch_args(x, w4, bias, torch.empty(1, 128, 8, 8).half(), cg.GluonConvConfig.parse("g8x8n128k64s4c1e1p"),
                        3, taps=4)  # fmt: skip
    assert subpixel_conv_gluon_supported(x, w4, bias, "g8x8n128k64s4c1e1p")
    assert not subpixel_conv_gluon_supported(x, w4, bias, "g8x8n256k64s4c1e1p")  # Co = 128 < its width


# ---- routing: ops.upsample_conv_op takes the conv table's sub-pixel entry -----------------------------


@needs_interpreter
def test_upsample_conv_op_routing(fake_gpu, tmp_path, monkeypatch):
    """Inside a loop scope, an upsampler whose sub-pixel conv (the k2 conv of weight4 into 4·Co channels) has a
    Gluon entry in the card's table runs as one sub-pixel launch (writing a GroupNorm reader's statistics);
    without the entry or with the conv kernels off it takes the cuDNN + interleave path."""
    x, wt, _, bias = make(2, 64, 16, 16, 128)
    conv = torch.nn.Conv2d(64, 128, 3, padding=1).half().to(memory_format=CL)
    conv.weight.data, conv.bias.data = wt, bias
    key = conv_table.shape_key(tuple(x.shape), 4 * 128, 2, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    card = conv_table.card_name(torch.device("cpu"))
    path.write_text(json.dumps({"cards": {card: {key: {"best": "gluon", "config": "g8x8n128k64s4c1e1p"}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    on = ops.Flags(igemm_conv=True, subpixel_upsample=True, group_norm=True, channels_last=True)
    want = subpixel_upsample_conv_ref(x.float(), wt.float(), bias.float())
    try:
        with ops.using(on), ops.loop_scope():
            y = ops.upsample_conv_op(x, conv)
            assert fake_gpu == [(cg.GluonConvConfig.parse("g8x8n128k64s4c1e1p"), False)]
            torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-3)
            y = ops.upsample_conv_op(x, conv, next_groups=32)  # a GroupNorm reader: the epilogue's statistics
            assert len(fake_gpu) == 2 and fake_gpu[-1][1] and hasattr(y, GN_STATS_ATTR)
        with ops.using(on.replace(igemm_conv=False)), ops.loop_scope():
            ops.upsample_conv_op(x, conv)
        with ops.using(on), ops.loop_scope():
            ops.upsample_conv_op(x[:1].contiguous(memory_format=CL), conv)  # no entry for batch 1
        assert len(fake_gpu) == 2
    finally:
        conv_table._table.cache_clear()


def test_subpixel_config_reads_the_k2_entry(tmp_path, monkeypatch):
    key = conv_table.shape_key((2, 1280, 16, 16), 5120, 2, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    card = conv_table.card_name(torch.device("cpu"))
    path.write_text(json.dumps({"cards": {card: {key: {"best": "gluon", "config": "g8x8n256+64k64s4c1e2p"}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    try:
        cfg = conv_table.subpixel_config((2, 1280, 16, 16), 1280, torch.float16, torch.device("cpu"))
        assert cfg == cg.GluonConvConfig.parse("g8x8n256+64k64s4c1e2p")
        assert conv_table.subpixel_config((2, 1280, 8, 8), 1280, torch.float16, torch.device("cpu")) is None
    finally:
        conv_table._table.cache_clear()


# ---- sm_90 ahead-of-time compile -------------------------------------------------------------------------

# config[:statistics' channels a group]: the UNet's (no statistics), the VAE's (groups of 16), a bn1 tile's
# per-channel statistics
AOT = ["g8x8n256+64k64s4c1e2p", "g8x8n128+32k64s5c1e1p", "g8x8n128k64s4c1e1p", "g8x8b2n128k64s4c2e1p",
       "g16x16n128k64s4c2e2p:16", "g8x8n128+32k64s5c1e1p:20"]  # fmt: skip
_AOT_CHILD = """
import sys, torch
from pathlib import Path
from speedsd.kernels import conv_gluon as cg
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    key, _, cpg = name.partition(":")
    k = cg.compile_sm90(cg.GluonConvConfig.parse(key), torch.float16, taps=4, stats_cpg=int(cpg) if cpg else None)
    (out / f"{name}.ptx").write_text(k.asm["ptx"])
"""


@pytest.fixture(scope="module")
def sm90_ptx(tmp_path_factory):
    require_gluon_aot(cg._kernels() is not None)
    out = tmp_path_factory.mktemp("aot_subpixel")
    run_compile_child(_AOT_CHILD, cg.__file__, str(out), *AOT)
    return {key: ((out / f"{key}.ptx").read_text(), ptxas_log(out / f"{key}.ptx")) for key in AOT}


@pytest.mark.parametrize("key", AOT)
def test_aot_compile_sm90(key, sm90_ptx):
    ptx, log = sm90_ptx[key]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.4d.shared::cluster.global" in ptx  # x boxes
    assert ("st.global" in ptx) == (":" in key)  # the statistics are the only global stores
    assert "cp.async.bulk.tensor.5d.global.shared::cta" in ptx  # the interleaved 5-D store
    assert spills(log) == (0, 0), log
    assert "serialized" not in log, log


# ---- GPU (sm_90) -------------------------------------------------------------------------------------

GPU_CASES = [  # (N, C, H, W, Co), config: the UNet's 16² and 32² upsamplers, and odd shapes
    pytest.param((2, 1280, 16, 16, 1280), "g8x8n256+64k64s4c1e2p", id="unet16"),
    pytest.param((2, 640, 32, 32, 640), "g8x8n128+32k64s5c1e1p", id="unet32-bn128+32"),
    pytest.param((2, 640, 32, 32, 640), "g8x8n128k64s4c1e1p", id="unet32-bn128"),
    pytest.param((1, 128, 9, 13, 256), "g8x8n128k64s4c1e1p", id="edge-tiles"),
    pytest.param((2, 64, 5, 7, 128), "g8x8b2n128k64s4c2e1p", id="tb2-small"),
    pytest.param((1, 512, 64, 64, 512), "g16x16n128k64s4c2e2p", id="vae64-16x16"),
    pytest.param((1, 256, 64, 40, 256), "g8x16n256k64s4c2e2p", id="vae-like-8x16-bn256"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, key", GPU_CASES)
def test_gpu_subpixel_conv(shape, key):
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and cg._kernels()):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")
    torch.backends.cudnn.allow_tf32 = False
    n, c, h, w, co = shape
    x, wt, w4, bias = make(n, c, h, w, co, device="cuda")
    out = torch.full((n, co, 2 * h, 2 * w), float("nan"), device="cuda").half().contiguous(memory_format=CL)
    y = subpixel_conv_gluon(x, w4, bias, key, out=out)
    torch.cuda.synchronize()
    assert y is out and not y.isnan().any(), "unwritten outputs"
    ref = subpixel_upsample_conv_ref(x.double(), wt.double(), bias.double())
    engine = subpixel_upsample_conv(x, w4, bias)  # cuDNN's fp16 phase conv + the interleave
    err, err16 = (y.double() - ref).abs().max().item(), (engine.double() - ref).abs().max().item()
    assert err <= 2 * err16, (err, err16)
    cfg = cg.GluonConvConfig.parse(key)
    if not subpixel_conv_gluon_supported(x, w4, bias, key, 32):  # two images a tile, or groups of 20 in 128 slabs
        return
    y = subpixel_conv_gluon(x, w4, bias, key, stats_groups=32)  # the statistics epilogue: same values, partials
    torch.cuda.synchronize()
    assert (y.double() - ref).abs().max().item() <= 2 * err16
    stats = getattr(y, GN_STATS_ATTR)
    want = subpixel_stats_ref(y, 32, cfg, per_channel=cfg.bn1 > 0)
    assert torch.equal(stats.part[2].cpu(), want[2].cpu())  # the counts
    torch.testing.assert_close(stats.part[0].cpu(), want[0].cpu(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.part[1].cpu(), want[1].cpu(), atol=1e-3, rtol=2e-5)
