"""Gluon 3x3 conv (kernels/conv_gluon.py).

CPU: the config's string round trip and validation, the launcher's checks (clear ValueErrors) and the
predicate (False for the same inputs), the host-side plumbing run against a torch model of the kernel's tile
walk (TMA boxes with zero fill, clipped stores) on the launcher's own descriptors, the reference and the
conv-table dispatch in ops; the sm_90 ahead-of-time compile is test_conv_gluon_aot.py. Gluon kernels do not
run under the interpreter, so every numerical check of the kernel is a GPU test (sm_90 only): NaN-poisoned
outputs, error vs an fp32 reference <= 2x cuDNN fp16's on the VAE decoder's shapes and odd ones, writes
clipped at the tensor's edge, and a CUDA-graph capture through ops.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from interp_bounds import needs_interpreter
from speedsd import conv_table, ops
from speedsd.kernels import conv_gluon as cg

CL = torch.channels_last


def make(n, c, h, w, co, device="cpu", seed=0, bias_dtype=None):
    """x = randn·2 + 0.5, weight ~ N(0, 1/(9C)) + 0.01 (fp16, channels_last), bias ~ N(0.3, 1) or None."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).half().to(device).contiguous(memory_format=CL)
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5 + 0.01).half().to(device).contiguous(memory_format=CL)
    bias = None if bias_dtype is None else (torch.randn(co, generator=g) + 0.3).to(device, bias_dtype)
    return x, wt, bias


# ---- launcher checks -------------------------------------------------------------------------------


def test_images_per_tile_round_trip_and_refusals(fake_gpu):
    cfg = cg.GluonConvConfig(th=8, tw=8, bn=128, stages=5, consumers=2, split=5, tb=2)
    assert str(cfg) == "g8x8b2n128k64s5c2e1sk5p" and cg.GluonConvConfig.parse(str(cfg)) == cfg and cfg.bm == 128
    assert str(dataclasses.replace(cfg, tb=1, consumers=1)) == "g8x8n128k64s5c1e1sk5p"
    for bad in ("g8x8b1n128k64s5c2e1p", "g8x8b0n128k64s5c2e1p", "g8x8bn128k64s5c2e1p"):
        with pytest.raises(ValueError, match="not a Gluon conv config"):
            cg.GluonConvConfig.parse(bad)
    with pytest.raises(ValueError, match="tb"):
        dataclasses.replace(cfg, tb=3)
    with pytest.raises(ValueError, match="<= 256 pixels"):
        cg.GluonConvConfig(th=16, tw=16, tb=2)  # 512 rows a tile
    x, wt, _ = make(3, 128, 8, 8, 128)
    with pytest.raises(ValueError, match="N=3 must be a multiple of its 2 images"):
        cg.conv3x3_gluon(x, wt, None, "g8x8b2n128k64s4c1e1p")
    one = cg.resolve("g8x8b2n128k64s4c1e1p", 128)
    assert "writes no statistics" in cg.conv_gluon_epilogue_problem(x[:2], wt, None, 32, one)
    g, args, _ = cg._launch_args(x[:2], wt, None, torch.empty(2, 128, 8, 8).half().contiguous(memory_format=CL), one,
                                 132)  # fmt: skip
    assert g == (1,) and args[-1] == 1 and args[0].block_shape == [2, 8, 8, 64]  # one unit: both images
    assert not fake_gpu


def test_split_refusals(fake_gpu):
    x, wt, bias = make(1, 128, 8, 8, 128, bias_dtype=torch.float16)
    with pytest.raises(ValueError, match="19 K splits need 9·C / 64 >= 19 K steps"):
        cg.conv3x3_gluon(x, wt, bias, "g8x16n128k64s4c1e1sk19p")
    cfg = cg.resolve("g8x16n128k64s4c1e1sk2p", 128)
    r = torch.zeros(1, 128, 8, 8).half().contiguous(memory_format=CL)
    assert cg.conv_gluon_epilogue_problem(x, wt, r, None, cfg) is None  # the partial sum adds a residual
    assert "K split" in cg.conv_gluon_epilogue_problem(x, wt, None, 32, cfg)  # but writes no statistics
    assert "K split" in cg.conv_gluon_epilogue_problem(x, wt, r, 32, cfg)
    with pytest.raises(ValueError, match="K split"):
        cg.conv3x3_gluon(x, wt, bias, cfg, residual=r, stats_groups=32)
    y16 = torch.empty(1, 128, 8, 8).half().contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="fp32 partials"):
        cg._launch_args(x, wt, None, y16, cfg, 132)
    parts = torch.empty(2, 1, 8, 8, 128)
    with pytest.raises(ValueError, match="without bias"):
        cg._launch_args(x, wt, bias, parts, cfg, 132)
    assert not fake_gpu


def _misaligned():
    x, wt, _ = make(1, 64, 6, 8, 128)
    buf = torch.empty(x.numel() + 8, dtype=torch.float16)
    return buf[1 : 1 + x.numel()].view(1, 6, 8, 64).permute(0, 3, 1, 2), wt, None  # channels_last, 2 B off


BAD = [
    pytest.param(lambda x, w, b: (x[0], w, b), "expects x", id="3d-x"),
    pytest.param(lambda x, w, b: (x, w[:, :32], b), "expects x", id="weight-C-differs"),
    pytest.param(lambda x, w, b: (x, w[..., :1, :1], b), "expects x", id="1x1-weight"),
    pytest.param(lambda x, w, b: (x.float(), w.float(), b), "fp16", id="fp32"),
    pytest.param(lambda x, w, b: (x.bfloat16(), w.bfloat16(), b), "fp16", id="bf16"),
    pytest.param(lambda x, w, b: (x, w, torch.ones(64).half()), "bias must be", id="bias-length"),
    pytest.param(lambda x, w, b: (x, w, torch.ones(128).bfloat16()), "bias must be", id="bias-bf16"),
    pytest.param(lambda x, w, b: (x, w, torch.ones(256).half()[::2]), "bias must be", id="bias-strided"),
    pytest.param(lambda x, w, b: (x, w, torch.ones(128, device="meta").half()), "one device", id="bias-device"),
    pytest.param(lambda x, w, b: (x[:, :, :0], w, b), "empty", id="empty"),
    pytest.param(lambda x, w, b: (x[:, :32], w[:, :32], b), "multiple of 64", id="C32"),
    pytest.param(lambda x, w, b: (x.contiguous(), w, b), "channels_last x", id="nchw-x"),
    pytest.param(lambda x, w, b: (x, w.contiguous(), b), "channels_last weight", id="nchw-weight"),
    pytest.param(lambda x, w, b: _misaligned(), "16-byte aligned", id="misaligned-x"),
    pytest.param(lambda x, w, b: (x, w, b), "sm_90", id="cpu-device"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_launcher_raises_clear_errors(args, match):
    x, w, b = args(*make(2, 64, 6, 8, 128))
    with pytest.raises(ValueError, match=match):
        cg.conv3x3_gluon(x, w, b)
    conv = torch.nn.Conv2d(x.shape[1], w.shape[0], 3, padding=1, bias=False) if w.dim() == 4 else None
    if conv is not None and conv.weight.shape == w.shape:
        conv.weight.data = w
        assert not cg.conv_gluon_supported(x, conv, b)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an sm_90 device with 3 SMs: the launch runs a torch model of the kernel's tile walk."""
    calls = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None):
        assert residual is None and part is None  # plain convs here (the epilogue: test_conv_gluon_epilogue.py)
        calls.append(cfg)
        _emulate(x, weight, bias, y, cfg, sms=3)

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    return calls


def _emulate(x, weight, bias, y, cfg, sms):
    """The kernel's work on the launcher's own descriptors: every program walks units p, p + grid, ... (or one
    each); a unit (tile, split sp) runs K steps [sp·KS / S, (sp + 1)·KS / S), KS = 9·C / BK, step ks = tap
    ks % 9 of channel block ks // 9, reading
    [TH, TW, BK] boxes (zero outside [N, H, W, C], as TMA fills) and [BN, BK] weight blocks; the fp32 sum
    (+ bias) is stored as y's dtype (fp16, or a split's fp32 partial at row sp·N + b), clipped at the edge."""
    grid, args, const = cg._launch_args(x, weight, bias, y, cfg, sms)
    xd, wd, yd, _, _, _, w1d, y1d, bias_ptr, _, _, c, _, _, _, n_img, n_th, n_tw, n_split, n_nb, num_units = args
    assert xd.block_shape == [cfg.tb, cfg.th, cfg.tw, cfg.bk] and wd.block_shape == [cfg.bn, cfg.bk]
    assert yd.block_shape == [cfg.tb, cfg.th, cfg.tw, cfg.bn // cfg.epi_split] and const["num_warps"] == cfg.warps
    assert const["HAS_BIAS"] == (bias is not None) and (bias is None or bias_ptr is bias)
    assert n_split == cfg.split and yd.base.shape[0] == n_split * n_img
    x_nhwc, w_mat, y_nhwc = xd.base, wd.base, yd.base
    assert const["BN1"] == cfg.bn1 and (cfg.bn1 == 0 or (w1d.base is w_mat and y1d.base is y_nhwc))
    if cfg.bn1:  # the tile's last bn1 channels: their own weight and output boxes
        assert w1d.block_shape == [cfg.bn1, cfg.bk] and y1d.block_shape == [cfg.tb, cfg.th, cfg.tw, cfg.bn1]
    width = cfg.bn + cfg.bn1
    _, h, w, _ = x_nhwc.shape
    xp = F.pad(x_nhwc.float(), (0, 0, 1, cfg.tw + 1, 1, cfg.th + 1))  # zero fill around [H, W]
    ks_total = 9 * (c // cfg.bk)
    seen, blocks = [], {}
    for p in range(grid[0]):
        for t in range(p, num_units, grid[0]) if cfg.persistent else [p]:
            seen.append(t)
            nb, r = t % n_nb, t // n_nb
            sp, r = r % n_split, r // n_split
            tx, r = r % n_tw, r // n_tw
            ty, b = r % n_th, r // n_th * cfg.tb  # a tile's first image
            oy0, ox0, n0 = ty * cfg.th, tx * cfg.tw, nb * width
            acc = torch.zeros(cfg.bm, width)
            for ks in range(sp * ks_total // n_split, (sp + 1) * ks_total // n_split):
                blocks[(b, ty, tx, nb, ks)] = blocks.get((b, ty, tx, nb, ks), 0) + 1
                cb, tap = divmod(ks, 9)
                ky, kx = divmod(tap, 3)  # box at (oy0 + ky − 1, ox0 + kx − 1): + 1 in the padded xp
                c0 = cb * cfg.bk
                rows, cols = slice(oy0 + ky, oy0 + ky + cfg.th), slice(ox0 + kx, ox0 + kx + cfg.tw)
                box = xp[b : b + cfg.tb, rows, cols, c0 : c0 + cfg.bk]
                blk = w_mat[n0 : n0 + width, tap * c + c0 : tap * c + c0 + cfg.bk].float()
                acc += box.reshape(cfg.bm, cfg.bk) @ blk.T  # [TB·TH·TW, BK] @ [BK, BN]
            if bias is not None:
                acc += bias_ptr[n0 : n0 + width].float()
            tile = acc.to(y_nhwc.dtype).view(cfg.tb, cfg.th, cfg.tw, width)[:, : h - oy0, : w - ox0]  # clipped
            out_rows = slice(sp * n_img + b, sp * n_img + b + cfg.tb)
            y_nhwc[out_rows, oy0 : oy0 + cfg.th, ox0 : ox0 + cfg.tw, n0 : n0 + width] = tile
    assert sorted(seen) == list(range(num_units)), "every unit exactly once"
    steps = n_img // cfg.tb * n_th * n_tw * n_nb * ks_total
    assert len(blocks) == steps and set(blocks.values()) == {1}, "each K step once"


CPU_CASES = [
    pytest.param((2, 64, 12, 20, 128), "ws2", None, id="B2-partial-tiles-ws2-16x16"),
    # K splits: the partials' sum is a Triton kernel, on these CPU tensors only under the interpreter
    pytest.param(
        (2, 192, 12, 20, 128), "g8x16n128k64s4c1e1sk3p", torch.float16, id="split3-fp16-bias", marks=needs_interpreter
    ),
    pytest.param(
        (1, 320, 9, 17, 64), "g8x8n64k64s4c1e1sk2p", None, id="split2-uneven-C5blocks", marks=needs_interpreter
    ),
    pytest.param(
        (1, 448, 5, 7, 128),
        "g8x16n128k64s3c1e2sk3",
        torch.float32,
        id="split3-of-7-nonpersistent",
        marks=needs_interpreter,
    ),
    pytest.param((1, 128, 9, 17, 256), "ws2_np", torch.float16, id="H9W17-ws2np-fp16-bias"),
    pytest.param((2, 64, 10, 8, 128), "ws", torch.float32, id="B2-ws-fp32-bias"),
    pytest.param((1, 64, 5, 7, 320), "ws_np", None, id="tile-larger-than-image-Co320"),
    # two images a tile (the UNet's 8² level): 8 x 8 pixels of both, and an image smaller than the tile
    pytest.param((2, 128, 8, 8, 256), "g8x8b2n128k64s5c2e1p", torch.float16, id="tb2-8x8-c2-fp16-bias"),
    pytest.param((4, 64, 5, 6, 128), "g8x8b2n128k64s4c1e1", None, id="tb2-N4-image-smaller-than-tile"),
    pytest.param(
        (2, 320, 8, 8, 128), "g8x8b2n128k64s5c1e1sk3p", torch.float32, id="tb2-split3", marks=needs_interpreter
    ),
    # K-step splits whose bounds fall inside channel blocks (5 splits of 18 K steps; 13 of 45)
    pytest.param(
        (2, 128, 8, 8, 128), "g8x8b2n128k64s5c1e1sk5p", None, id="tb2-split5-of-18-steps", marks=needs_interpreter
    ),
    pytest.param(
        (1, 320, 6, 9, 64), "g8x8n64k64s4c1e1sk13p", torch.float16, id="split13-of-45-steps", marks=needs_interpreter
    ),
    # tiles of bn + bn1 channels (Co = 320 as 2 x (128 + 32); 3 x (64 + 16) with a bias; with a K split)
    pytest.param((2, 64, 12, 20, 320), "g8x16n128+32k64s5c2e1p", None, id="bn128+32-Co320"),
    pytest.param((1, 128, 9, 17, 240), "g8x8n64+16k64s4c1e1", torch.float16, id="bn64+16-Co240-fp16-bias"),
    pytest.param((2, 192, 8, 8, 320), "g8x16n128+32k64s4c2e1sk2p", None, id="bn128+32-split2", marks=needs_interpreter),
]


@pytest.mark.parametrize("shape, name, bias_dtype", CPU_CASES)
def test_launcher_plumbing_against_tile_model(shape, name, bias_dtype, fake_gpu):
    n, c, h, w, co = shape
    x, wt, bias = make(n, c, h, w, co, bias_dtype=bias_dtype)
    out = torch.full((n, co, h, w), float("nan"), dtype=torch.float16).contiguous(memory_format=CL)
    res = cg.conv3x3_gluon(x, wt, bias, name, out=out)
    assert fake_gpu == [cg.resolve(name, co)] and res is out
    assert not out.isnan().any(), "unwritten outputs"
    ref = cg.conv3x3_gluon_ref(x.double(), wt.double(), None if bias is None else bias.double())
    err = (res.double() - ref).abs().max().item()
    err16 = F.conv2d(x.float(), wt.float(), None if bias is None else bias.float(), padding=1).half().double() - ref
    assert err <= 2 * err16.abs().max().item() + 1e-6, err
    fresh = cg.conv3x3_gluon(x, wt, bias, name)
    assert fresh.is_contiguous(memory_format=CL) and torch.equal(fresh, res)
    conv = torch.nn.Conv2d(c, co, 3, padding=1).half()
    conv.weight.data = wt
    assert cg.conv_gluon_supported(x, conv, bias, name)


@pytest.mark.parametrize("key", ["g8x16n128k64s4c1e1sk3p", "g8x8b2n128k64s5c1e1sk3p"], ids=["tb1", "tb2"])
def test_partials_sum_to_the_conv(fake_gpu, key):
    """conv3x3_gluon_partials: the split's fp32 partials [split, N·H·W, Co] in the output's channels_last order,
    not summed (two images a tile: the same layout); their sum is the conv. A config without a K split is
    refused."""
    x, wt, _ = make(2, 192, 12, 20, 128)
    parts = cg.conv3x3_gluon_partials(x, wt, key)
    assert parts.shape == (3, 2 * 12 * 20, 128) and parts.dtype == torch.float32 and parts.is_contiguous()
    got = parts.double().sum(0).view(2, 12, 20, 128).permute(0, 3, 1, 2)  # [N·H·W, Co] -> [N, Co, H, W]
    ref = cg.conv3x3_gluon_ref(x.double(), wt.double())
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert all(p.abs().sum() > 0 for p in parts), "every split contributes"
    with pytest.raises(ValueError, match="no K split"):
        cg.conv3x3_gluon_partials(x, wt, "g8x16n128k64s4c1e1p")
    assert len(fake_gpu) == 1


def test_out_and_geometry_checks(fake_gpu):
    x, wt, _ = make(1, 64, 6, 8, 128)
    for out in (torch.empty(1, 128, 6, 8).half(), torch.empty(1, 128, 6, 8).contiguous(memory_format=CL),
                torch.empty(1, 64, 6, 8).half().contiguous(memory_format=CL)):  # fmt: skip
        with pytest.raises(ValueError, match="out must be"):
            cg.conv3x3_gluon(x, wt, out=out)
    conv = torch.nn.Conv2d(64, 128, 3, padding=1, bias=False).half()
    conv.weight.data = wt
    assert cg.conv_gluon_supported(x, conv) and not cg.conv_gluon_supported(x, conv, config="ws3")
    for kw in (dict(stride=2), dict(padding=0), dict(dilation=2, padding=2), dict(padding_mode="reflect")):
        other = torch.nn.Conv2d(64, 128, 3, **{"padding": 1, **kw}).half()
        other.weight.data = wt
        assert not cg.conv_gluon_supported(x, other), kw
    grouped = torch.nn.Conv2d(64, 128, 3, padding=1, groups=2).half().to(memory_format=CL)
    assert not cg.conv_gluon_supported(x, grouped)
    assert not fake_gpu


def test_launch_grid():
    """Persistent: min(#SMs, #tiles) programs; otherwise one a tile (8 x 16 tiles of 300 x 50 px, 2 x 2 Co)."""
    x, wt, _ = make(2, 64, 300, 50, 512)
    y = torch.empty(2, 512, 300, 50).half().contiguous(memory_format=CL)
    tiles = 2 * 38 * 4 * 2
    for name, grid in (("ws2", 132), ("ws2_np", tiles)):
        g, args, _ = cg._launch_args(x, wt, None, y, cg.variant(name, 512), 132)
        assert g == (grid,) and args[10:] == (0, 64, 300, 50, 512, 2, 38, 4, 1, 2, tiles) and args[8] is y


def test_launch_grid_with_split():
    """A K split multiplies the units: 2x16² at 8 x 16 pixels and 128 of 1280 channels is 40 tiles; 3 splits
    make 120 units (one persistent program each on 132 SMs); y is the [3·N, H, W, Co] fp32 partials."""
    x, wt, _ = make(2, 1280, 16, 16, 1280)
    cfg = cg.resolve("g8x16n128k64s4c1e1sk3p", 1280)
    parts = torch.empty(3, 2, 16, 16, 1280)
    g, args, const = cg._launch_args(x, wt, None, parts, cfg, 132)
    assert g == (120,) and args[10:] == (0, 1280, 16, 16, 1280, 2, 2, 1, 3, 10, 120) and not const["HAS_BIAS"]
    assert list(args[2].base.shape) == [6, 16, 16, 1280] and args[2].block_shape == [1, 8, 16, 128]


def test_reference_is_the_conv():
    x, wt, bias = make(2, 64, 5, 7, 64, bias_dtype=torch.float32)
    ref = cg.conv3x3_gluon_ref(x, wt, bias)
    assert ref.dtype == torch.float32
    # the sum over the nine taps of shifted inputs, written out
    xp = F.pad(x.double(), (1, 1, 1, 1))
    want = (
        sum(
            torch.einsum("bchw,oc->bohw", xp[:, :, ky : ky + 5, kx : kx + 7], wt[:, :, ky, kx].double())
            for ky in range(3)
            for kx in range(3)
        )
        + bias.double()[:, None, None]
    )
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


# ---- dispatch through ops and the conv table --------------------------------------------------------


@pytest.fixture
def gluon_table(tmp_path, monkeypatch):
    """A conv table naming the Gluon conv (ws2) for 1x64x6x8->128 fp16 on this machine's card ("cpu")."""
    cfg = cg.variant("ws2", 128)
    key = conv_table.shape_key((1, 64, 6, 8), 128, 3, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    entry = {"best": "gluon", "config": str(cfg), "gluon_config": str(cfg), "graph_ms": {}}
    path.write_text(json.dumps({"cards": {conv_table.card_name(torch.device("cpu")): {key: entry}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    yield cfg
    conv_table._table.cache_clear()


def _conv(bias=True):
    conv = torch.nn.Conv2d(64, 128, 3, padding=1, bias=bias).half()
    with torch.no_grad():
        conv.weight.copy_(make(1, 64, 6, 8, 128)[1])
        if bias:
            conv.bias.add_(0.5)
    return conv.to(memory_format=CL)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@needs_interpreter  # CPU tensors through the dispatch; on a GPU the graph test below routes through ops
def test_table_entry_routes_to_gluon(gluon_table, monkeypatch, with_bias):
    calls = []
    marker = torch.zeros(1)

    def fake(x, weight, bias=None, config=None, out=None):
        calls.append((x, weight, bias, config))
        return marker

    monkeypatch.setattr(ops, "conv_gluon_supported", lambda *a: True)
    monkeypatch.setattr(ops, "conv3x3_gluon", fake)
    conv = _conv()
    x = make(1, 64, 6, 8, 128)[0]
    assert conv_table.choose((1, 64, 6, 8), 128, 3, 1, 1, torch.float16, x.device) == gluon_table
    with ops.using(ops.Flags(igemm_conv=True)):
        assert ops.conv2d_op(x, conv, with_bias=with_bias) is marker
        ((cx, cw, cb, cfg),) = calls
        assert cx is x and cw is conv.weight and cfg == gluon_table
        assert cb is (conv.bias if with_bias else None)
        assert ops.conv2d_op(make(1, 64, 6, 9, 128)[0], conv) is not marker  # other shape: no entry
    with ops.using(ops.Flags()):
        assert ops.conv2d_op(x, conv) is not marker  # flag off: cuDNN
    assert len(calls) == 1


@needs_interpreter  # CPU tensors through the kernels (bias_add); a GPU machine runs no interpreter
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-epilogues"])
def test_unsupported_gluon_entry_falls_back_to_cudnn(gluon_table, fused):
    """On this CPU the predicate says no (no sm_90): the conv runs as F.conv2d, bias handled as without."""
    conv = _conv()
    x = make(1, 64, 6, 8, 128)[0]
    assert not cg.conv_gluon_supported(x, conv, conv.bias, gluon_table)
    with ops.using(ops.Flags(igemm_conv=True, fused_epilogues=fused)):
        got = ops.conv2d_op(x, conv)
    with ops.using(ops.Flags(fused_epilogues=fused)):
        want = ops.conv2d_op(x, conv)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.float(), F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1),
                               atol=2e-2, rtol=2e-2)  # fmt: skip


# ---- GPU (sm_90) -----------------------------------------------------------------------------------


def _require_hopper() -> None:
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and cg._kernels()):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")


@pytest.fixture
def no_tf32():
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference, not TF32
    yield
    torch.backends.cudnn.allow_tf32 = prev


def _check_gpu(shape, config, bias_dtype, seed=0):
    """NaN-poisoned out fully written; max abs and relative error vs fp32 <= 2x cuDNN fp16's."""
    n, c, h, w, co = shape
    x, wt, bias = make(n, c, h, w, co, device="cuda", seed=seed, bias_dtype=bias_dtype)
    out = torch.full((n, co, h, w), float("nan"), device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    res = cg.conv3x3_gluon(x, wt, bias, config, out=out)
    torch.cuda.synchronize()
    assert res is out and not out.isnan().any(), "unwritten outputs"
    b32 = None if bias is None else bias.float()
    ref = F.conv2d(x.float(), wt.float(), b32, padding=1)
    cudnn = F.conv2d(x, wt, None if bias is None else bias.half(), padding=1)
    for metric in (lambda d: d.abs().max(), lambda d: d.norm() / ref.norm()):
        err, err16 = metric(res.float() - ref).item(), metric(cudnn.float() - ref).item()
        assert err <= 2 * err16, (err, err16)
    return x, wt, bias, res


VAE_SHAPES = [
    pytest.param((1, 128, 512, 512, 128), id="vae-512-128to128"),
    pytest.param((1, 256, 512, 512, 128), id="vae-512-256to128"),
    pytest.param((1, 256, 256, 256, 256), id="vae-256-256to256"),
    pytest.param((1, 512, 256, 256, 256), id="vae-256-512to256"),
    pytest.param((1, 512, 128, 128, 512), id="vae-128-512to512"),
    pytest.param((1, 512, 64, 64, 512), id="vae-64-512to512"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ws2", "ws"])
@pytest.mark.parametrize("shape", VAE_SHAPES)
def test_gpu_vae_shapes(shape, name, no_tf32):
    _require_hopper()
    _check_gpu(shape, name, None)


ODD_SHAPES = [
    pytest.param((2, 128, 24, 40, 128), id="B2-H24-W40-Co128"),
    pytest.param((1, 256, 13, 37, 256), id="H13-W37"),
    pytest.param((2, 320, 24, 40, 320), id="B2-Co320-bn64"),
    pytest.param((3, 192, 9, 33, 384), id="B3-C192-Co384"),
    pytest.param((1, 64, 5, 7, 64), id="tile-larger-than-image"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [None, torch.float16], ids=["no-bias", "bias16"])
@pytest.mark.parametrize("name", list(cg.VARIANTS))
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_gpu_odd_shapes(shape, name, bias_dtype, no_tf32):
    _require_hopper()
    _check_gpu(shape, name, bias_dtype, seed=sum(shape))


SPLIT_CASES = [  # (shape, config): the UNet's 32² / 16² / 8² convs, uneven splits, partial tiles, 2 consumers
    pytest.param((2, 640, 32, 32, 640), "g8x16n128k64s4c1e1sk3p", id="unet32-640-split3"),
    pytest.param((2, 1280, 16, 16, 1280), "g16x16n128k64s3c2e2sk3p", id="unet16-1280-c2-split3"),
    pytest.param((2, 2560, 16, 16, 1280), "g8x16n256k64s3c2e4sk2p", id="unet16-2560-bn256-split2"),
    pytest.param((2, 1280, 8, 8, 1280), "g8x8n128k64s5c1e1sk6p", id="unet8-1280-split6"),
    pytest.param((2, 320, 13, 21, 128), "g8x16n128k64s4c1e1sk4p", id="odd-5blocks-split4"),
    pytest.param((1, 192, 9, 33, 256), "g8x8n256k64s4c1e2sk3", id="odd-nonpersistent-split3"),
    # two images a tile (both CFG halves of the 8² level in one 128-row tile), uneven splits, N = 4
    pytest.param((2, 1280, 8, 8, 1280), "g8x8b2n128k64s5c2e1sk12p", id="unet8-1280-tb2-c2-split12"),
    pytest.param((2, 2560, 8, 8, 1280), "g8x8b2n128k64s5c1e1sk16p", id="unet8-2560-tb2-c1-split16"),
    pytest.param((4, 192, 5, 7, 128), "g8x8b2n128k64s4c2e1sk2", id="odd-tb2-N4-nonpersistent-split2"),
]

WIDE_CASES = [  # tiles of bn + bn1 channels: the UNet's 64² convs to 320, odd sizes, a K split, one consumer
    pytest.param((2, 320, 64, 64, 320), "g8x16n128+32k64s5c2e1p", id="unet64-320-128+32-c2"),
    pytest.param((2, 640, 64, 64, 320), "g8x8n256+64k64s4c1e2p", id="unet64-640to320-256+64-c1"),
    pytest.param((1, 192, 13, 21, 480), "g8x16n128+32k64s4c1e1p", id="odd-Co480-c1"),
    pytest.param((2, 320, 9, 17, 320), "g8x16n128+32k64s4c2e1sk3p", id="odd-128+32-split3"),
    pytest.param((1, 64, 5, 7, 80), "g8x8n64+16k64s4c1e1", id="tile-larger-than-image-64+16-nonpersistent"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32], ids=["no-bias", "bias16", "bias32"])
@pytest.mark.parametrize("shape, config", SPLIT_CASES + WIDE_CASES)
def test_gpu_split_k(shape, config, bias_dtype, no_tf32):
    """K split over (tile, split) units, fp32 partials summed (+ bias) by the second kernel; tiles of bn + bn1
    channels, the second accumulator's columns stored (and biased) where they belong."""
    _require_hopper()
    _check_gpu(shape, config, bias_dtype, seed=sum(shape))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, config", [SPLIT_CASES[1], SPLIT_CASES[3], SPLIT_CASES[4], SPLIT_CASES[6]])
def test_gpu_split_k_residual(shape, config, no_tf32):
    """A K split with a residual: the partial sum adds bias and residual in fp32 and rounds once; <= 2x the
    error of cuDNN fp16 + bias followed by a torch fp16 residual add (the unfused pair)."""
    _require_hopper()
    n, c, h, w, co = shape
    x, wt, bias = make(n, c, h, w, co, device="cuda", seed=7, bias_dtype=torch.float16)
    g = torch.Generator().manual_seed(8)
    r = (torch.randn(n, co, h, w, generator=g) - 0.4).half().cuda().contiguous(memory_format=CL)
    out = torch.full((n, co, h, w), float("nan"), device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    res = cg.conv3x3_gluon(x, wt, bias, config, out=out, residual=r)
    torch.cuda.synchronize()
    assert res is out and not out.isnan().any(), "unwritten outputs"
    ref = F.conv2d(x.float(), wt.float(), bias.float(), padding=1) + r.float()
    pair = F.conv2d(x, wt, bias, padding=1) + r
    err, err16 = (res.float() - ref).abs().max().item(), (pair.float() - ref).abs().max().item()
    assert err <= 2 * err16, (err, err16)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [None, torch.float32], ids=["no-bias", "bias32"])
@pytest.mark.parametrize(
    "shape, config",
    [((2, 256, 8, 8, 256), "g8x8b2n128k64s4c2e1p"), ((4, 128, 6, 5, 128), "g8x8b2n128k64s4c1e1")],
    ids=["8x8-c2", "N4-smaller-than-tile-c1-nonpersistent"],
)
def test_gpu_two_images_a_tile(shape, config, bias_dtype, no_tf32):
    """tb = 2 without a K split: [2, TH, TW, BN] fp16 boxes stored straight, clipped past the image."""
    _require_hopper()
    _check_gpu(shape, config, bias_dtype, seed=sum(shape))


@pytest.mark.gpu
def test_gpu_fp32_bias_and_clipped_writes(no_tf32):
    """Stores are clipped at the tensor's edge: an out inside a larger buffer keeps its neighbours."""
    _require_hopper()
    n, c, h, w, co = 1, 128, 13, 21, 256
    x, wt, bias, res = _check_gpu((n, c, h, w, co), "ws2", torch.float32)
    buf = torch.full((3 * h * w * co,), 7.0, device="cuda", dtype=torch.float16)
    out = buf[h * w * co : 2 * h * w * co].view(n, h, w, co).permute(0, 3, 1, 2)  # channels_last view
    cg.conv3x3_gluon(x, wt, bias, "ws2", out=out)
    torch.cuda.synchronize()
    assert torch.equal(out, res)
    assert (buf[: h * w * co] == 7).all() and (buf[2 * h * w * co :] == 7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("key", ["ws2", "g8x16n128k64s4c1e1sk3p"], ids=["ws2", "split3"])
def test_gpu_dispatch_in_cuda_graph(monkeypatch, tmp_path, no_tf32, key):
    """A table entry naming the Gluon conv (also a K-split one: its partials buffer comes from the graph's
    pool) serves ops.conv2d_op inside a captured CUDA graph; replays see new inputs; a non-channels_last input
    falls back to cuDNN."""
    _require_hopper()
    shape = (1, 256, 64, 64)
    cfg = cg.resolve(key, 256)
    key = conv_table.shape_key(shape, 256, 3, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    path.write_text(json.dumps({"cards": {torch.cuda.get_device_name(): {key: {"best": "gluon", "config": str(cfg)}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    served = []
    real = ops.conv3x3_gluon
    monkeypatch.setattr(ops, "conv3x3_gluon", lambda *a, **kw: served.append(a[3]) or real(*a, **kw))
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).cuda().half().to(memory_format=CL)
    static = make(*shape, 256, device="cuda")[0]
    flags = ops.Flags(igemm_conv=True, fused_epilogues=True, channels_last=True)
    try:
        with torch.inference_mode(), ops.using(flags):
            y = ops.conv2d_op(static, conv, with_bias=False)  # warm-up (compile) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = ops.conv2d_op(static, conv, with_bias=False)
            for seed in (1, 2):
                static.copy_(make(*shape, 256, device="cuda", seed=seed)[0])
                graph.replay()
                torch.cuda.synchronize()
                ref = F.conv2d(static.float(), conv.weight.float(), padding=1)
                err = (y.float() - ref).abs().max().item()
                err16 = (F.conv2d(static, conv.weight, padding=1).float() - ref).abs().max().item()
                assert not y.isnan().any() and err <= 2 * err16, (seed, err, err16)
            assert served == [cfg, cfg]
            nchw = static.contiguous()
            assert torch.equal(ops.conv2d_op(nchw, conv, with_bias=False), F.conv2d(nchw, conv.weight, padding=1))
            assert len(served) == 2
    finally:
        conv_table._table.cache_clear()
