"""The Gluon 3x3 conv's fused epilogue: bias + residual + the next GroupNorm's tile statistics.

CPU: the epilogue's config and checks, the launcher's arguments for it (the residual's K steps modelled on its
identity descriptors, bn + bn1 tiles included), and the whole hand-over path on a fake sm_90 device whose launch
is a torch model of the epilogue (conv + bias + residual, fp16, tile statistics): ops.conv_epilogue_op's routing,
and a VAE-style ResnetBlock2D with it against the block without it. GPU (sm_90): the kernel's output (<= 2x
cuDNN fp16's error), its tile statistics (per channel in a bn + bn1 tile) against the fp64 ones of its own
output, GroupNorm from them, on the VAE decoder's shapes, the UNet's 64² / 32² conv2 and odd ones (edge tiles,
batch 2), and a CUDA graph.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from interp_bounds import needs_interpreter
from speedsd import conv_table, ops
from speedsd.kernels import conv_gluon as cg
from speedsd.kernels import gn_tile_stats as ts
from speedsd.kernels.bias_add import GN_STATS_ATTR
from speedsd.kernels.group_norm import group_norm_ref
from speedsd.models.layers import ResnetBlock2D

CL = torch.channels_last


def make(n, c, h, w, co, device="cpu", seed=0):
    """x ~ 2·N + 0.5, weight ~ N(0, 1/(9C)) + 0.01, bias ~ N(0.3, 1), residual ~ N(-0.4, 1) (fp16, channels_last)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).half().to(device).contiguous(memory_format=CL)
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5 + 0.01).half().to(device).contiguous(memory_format=CL)
    bias = (torch.randn(co, generator=g) + 0.3).half().to(device)
    r = (torch.randn(n, co, h, w, generator=g) - 0.4).half().to(device).contiguous(memory_format=CL)
    return x, wt, bias, r


# ---- CPU: config, checks, launch arguments -----------------------------------------------------------


def test_epilogue_problems():
    x, wt, _, r = make(1, 64, 8, 8, 128)
    cfg = cg.variant("ws2", 128)
    assert cg.conv_gluon_epilogue_problem(x, wt, r, 32, cfg) is None
    assert "residual must be" in cg.conv_gluon_epilogue_problem(x, wt, r.contiguous(), None, cfg)
    assert "residual must be" in cg.conv_gluon_epilogue_problem(x, wt, r[:, :64], None, cfg)
    assert "residual must be" in cg.conv_gluon_epilogue_problem(x, wt, r.float(), None, cfg)
    assert "stats_groups=3" in cg.conv_gluon_epilogue_problem(x, wt, None, 3, cfg)
    assert cg.conv_gluon_epilogue_problem(x, wt, None, 2, cfg) is None  # 64-channel groups in 64-channel slabs
    e4 = cg.GluonConvConfig.parse("g16x16n128k64s4c2e4p")
    assert "stats_groups=2" in cg.conv_gluon_epilogue_problem(x, wt, None, 2, e4)  # 64-channel groups > 32 slabs
    # a bn + bn1 tile: the residual in both accumulators, statistics per channel (any group size)
    x, wt, _, r = make(1, 64, 8, 8, 320)
    for key in ("g8x8n256+64k64s4c1e4p", "g8x8n128+32k64s5c1e1p"):
        wide = cg.GluonConvConfig.parse(key)
        assert cg.conv_gluon_epilogue_problem(x, wt, r, 32, wide) is None  # 10 channels a group
        assert cg.conv_gluon_epilogue_problem(x, wt, None, 64, wide) is None
        assert "stats_groups=3" in cg.conv_gluon_epilogue_problem(x, wt, None, 3, wide)


def test_launch_args_for_the_epilogue():
    x, wt, bias, r = make(2, 64, 12, 20, 128)
    cfg = cg.GluonConvConfig.parse("g16x16n128k64s4c2e4p")  # 16 x 16 x 128 in 4 slabs
    y = torch.empty_like(r)
    part = torch.empty(3, 2, 32, 2 * cfg.warps)
    grid, args, const = cg._launch_args(x, wt, bias, y, cfg, 132, r, part)
    rd, idd = args[3], args[4]
    assert rd.block_shape == [1, 16, 16, 64] and rd.base.data_ptr() == r.data_ptr()
    assert idd.block_shape == [128, 64] and torch.equal(idd.base, torch.eye(128, dtype=torch.float16))
    assert args[5] is idd  # (no bn1 accumulator)
    assert args[8] is bias and args[9] is part and args[10:15] == (part[0].numel(), 64, 12, 20, 128)
    assert const["HAS_RES"] and const["STATS"] and const["CPG"] == 4 and const["EPI_SPLIT"] == 4
    _, args, const = cg._launch_args(x, wt, None, y, cfg, 132)
    assert args[8] is y and args[9] is y and not const["HAS_RES"] and not const["STATS"]


@pytest.mark.parametrize(
    "key, co", [("g8x8n256+64k64s4c1e4p", 320), ("g8x8n128+32k64s5c1e1p", 320), ("g8x16n128k64s4c2e4p", 256),
                ("g8x8n64+16k64s4c1e1p", 160)],  # fmt: skip
    ids=["bn256+64", "bn128+32-two-tiles", "bn128", "bn64+16-narrower-than-bk"],
)
def test_residual_k_steps_reproduce_the_residual(key, co):
    """The residual's K steps on the launcher's own descriptors: for tile channels n0 .. n0 + width, step j reads
    the residual box at channel n0 + j·BK (zero past Co, as TMA fills) times I[:BN] (and I[BN:]) at column j·BK;
    the sums are exactly the residual's channels of the tile (the boxes' channels past the tile meet zeros)."""
    cfg = cg.GluonConvConfig.parse(key)
    x, wt, _, r = make(1, 64, cfg.th, cfg.tw, co)  # one tile of pixels
    m = cfg.th * cfg.tw
    grid, args, const = cg._launch_args(x, wt, None, torch.empty_like(r), cfg, 132, r)
    rd, idd, i1d = args[3:6]
    assert const["HAS_RES"] and rd.block_shape == [1, cfg.th, cfg.tw, cfg.bk] and idd.block_shape == [cfg.bn, cfg.bk]
    eye = idd.base
    steps = -(-cfg.width // cfg.bk)
    assert tuple(eye.shape) == (cfg.width, steps * cfg.bk) and i1d.base is eye
    if cfg.bn1:
        assert i1d.block_shape == [cfg.bn1, cfg.bk]
    r_nhwc = F.pad(rd.base.float(), (0, steps * cfg.bk))  # channels past Co read as zeros
    for n0 in range(0, co, cfg.width):
        box = [r_nhwc[0, :, :, n0 + j * cfg.bk : n0 + (j + 1) * cfg.bk].reshape(m, cfg.bk) for j in range(steps)]
        acc = sum(b @ eye[: cfg.bn, j * cfg.bk : (j + 1) * cfg.bk].float().T for j, b in enumerate(box))
        want = r.float()[0, n0 : n0 + cfg.width].permute(1, 2, 0).reshape(m, cfg.width)
        assert torch.equal(acc, want[:, : cfg.bn])
        if cfg.bn1:
            acc1 = sum(b @ eye[cfg.bn :, j * cfg.bk : (j + 1) * cfg.bk].float().T for j, b in enumerate(box))
            assert torch.equal(acc1, want[:, cfg.bn :])


def test_launch_args_for_per_channel_statistics():
    """A bn + bn1 tile's statistics: CPG = 0 (per channel), part [3, N, tiles·warps, Co]."""
    x, wt, bias, r = make(2, 64, 16, 16, 320)
    cfg = cg.GluonConvConfig.parse("g8x8n256+64k64s4c1e4p")
    part = torch.empty(3, 2, 4 * cfg.warps, 320)
    _, args, const = cg._launch_args(x, wt, bias, torch.empty_like(r), cfg, 132, r, part)
    assert const["STATS"] and const["CPG"] == 0 and const["BN1"] == 64 and args[9] is part


# ---- CPU: the hand-over path on a fake sm_90 device ------------------------------------------------


@pytest.fixture
def fake_epilogue(monkeypatch):
    """Pretend an sm_90 device; the launch computes what the epilogue writes with torch (the kernel's own
    math is the GPU tests')."""
    calls = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None):
        _, _, const = cg._launch_args(x, weight, bias, y, cfg, 3, residual, part)
        calls.append((cfg, const["HAS_RES"], const["STATS"]))
        acc = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), padding=1)
        y.copy_(acc + (residual.float() if residual is not None else 0))
        if part is not None and cfg.bn1:  # per channel
            part.copy_(ts.chan_stats_ref(y, cfg.th, cfg.tw, cfg.warps))
        elif part is not None:
            part.copy_(ts.tile_stats_ref(y, part.shape[2], cfg.th, cfg.tw, cfg.warps))

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    return calls


@pytest.fixture
def epilogue_table(tmp_path, monkeypatch):
    """A conv table on this machine's card ("cpu") whose measured epilogue choices fuse both kinds for the block's
    convs (64 -> 128 and 128 -> 128 at 12 x 20), only the residual kind for 64 -> 128 at 12 x 24, neither at
    12 x 28."""
    path = tmp_path / "conv_table.json"
    path.write_text(json.dumps({"cards": {}}))
    cfg = str(cg.variant("ws2", 128))
    choices = {(64, 20): (cfg, cfg), (128, 20): (cfg, cfg), (64, 24): (None, cfg), (64, 28): (None, None)}
    entries = {
        conv_table.shape_key((1, cin, 12, w), 128, 3, 1, 1, torch.float16): {
            "epilogue": {"stats": stats, "residual": residual}
        }
        for (cin, w), (stats, residual) in choices.items()
    }
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table.record_epilogues(path, conv_table.card_name(torch.device("cpu")), entries)
    yield
    conv_table._table.cache_clear()
    conv_table._epilogue_table.cache_clear()


def test_recorded_epilogues_keep_the_plain_entry(tmp_path):
    path = tmp_path / "t.json"
    key = conv_table.shape_key((1, 64, 8, 8), 128, 3, 1, 1, torch.float16)
    plain = {"best": "gluon", "config": "g8x16n128k64s4c1e1", "graph_ms": {"cudnn": 1.0}}
    path.write_text(json.dumps({"cards": {"X": {key: plain}, "Y": {key: {"best": "cudnn"}}}}))
    conv_table.record_epilogues(path, "X", {key: {"epilogue": {"stats": None, "residual": "g8x16n128k64s4c1e2"}}})
    data = json.loads(path.read_text())["cards"]
    assert data["X"][key] == {**plain, "epilogue": {"stats": None, "residual": "g8x16n128k64s4c1e2"}}
    assert data["Y"] == {key: {"best": "cudnn"}}
    want = {(key, "residual"): cg.GluonConvConfig.parse("g8x16n128k64s4c1e2")}
    assert conv_table._epilogue_table("X", str(path)) == want
    path.write_text(json.dumps({"cards": {"X": {key: {"best": "cudnn", "epilogue": {"bias": "x"}}}}}))
    conv_table._epilogue_table.cache_clear()
    with pytest.raises(ValueError, match="unknown epilogue kind"):
        conv_table._epilogue_table("X", str(path))


@needs_interpreter
def test_conv_epilogue_op_routing(fake_epilogue, epilogue_table):
    x, wt, bias, r = make(1, 64, 12, 20, 128)
    conv = torch.nn.Conv2d(64, 128, 3, padding=1).half().to(memory_format=CL)
    conv.weight.data = wt
    on = ops.Flags(igemm_conv=True, fused_epilogues=True, group_norm=True)
    with ops.using(on):
        y = ops.conv_epilogue_op(x, conv, bias, r, 32)
        assert isinstance(getattr(y, GN_STATS_ATTR), ts.TileStats) and fake_epilogue[-1][1:] == (True, True)
        want = F.conv2d(x.float(), wt.float(), bias.float(), padding=1) + r.float()
        torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-3)
        assert ops.conv_epilogue_op(x, conv, bias, r) is not None and fake_epilogue[-1][1:] == (True, False)
        assert ops.conv_epilogue_op(x, conv, bias, None, 32) is not None and fake_epilogue[-1][1:] == (False, True)
        assert ops.conv_epilogue_op(x, conv, bias) is None  # a bias alone: nothing to fuse
        assert ops.conv_epilogue_op(x.contiguous(), conv, bias, r, 32) is None  # not channels_last
        for w, kinds in ((24, (False, True)), (28, (False, False))):  # the table's choices per kind
            xw, _, _, rw = make(1, 64, 12, w, 128)
            got = [ops.conv_epilogue_op(xw, conv, bias, res, 32) is not None for res in (None, rw)]
            assert tuple(got) == kinds, w
    with ops.using(on.replace(group_norm=False)):
        y = ops.conv_epilogue_op(x, conv, bias, r, 32)  # no GroupNorm kernel: no statistics to hand over
        assert y is not None and not hasattr(y, GN_STATS_ATTR)
        assert ops.conv_epilogue_op(x, conv, bias, None, 32) is None
    for off in (on.replace(igemm_conv=False), on.replace(fused_epilogues=False)):
        with ops.using(off):
            assert ops.conv_epilogue_op(x, conv, bias, r, 32) is None
    assert len(fake_epilogue) == 5


@needs_interpreter
@pytest.mark.parametrize("cin", [128, 64], ids=["identity-shortcut", "conv-shortcut"])
def test_resnet_block_with_fused_epilogues(fake_epilogue, epilogue_table, cin):
    """A VAE ResNet block (no time embedding) whose conv1 and conv2 run fused, handed its input as in the decoder
    (Owned) and followed by a GroupNorm: the same values as the block without the Gluon conv (tolerance: fp16
    rounding of bias and residual before vs after the store)."""
    from speedsd.models.layers import Owned

    torch.manual_seed(0)
    block = ResnetBlock2D(cin, 128, None, groups=32, eps=1e-6).half().to(memory_format=CL).eval()
    for p in block.parameters():
        p.data.add_(0.05)
    x = make(1, cin, 12, 20, 128)[0]
    norm = torch.nn.GroupNorm(32, 128, eps=1e-6).half()
    flags = ops.Flags(igemm_conv=True, fused_epilogues=True, group_norm=True, channels_last=True)
    with torch.inference_mode():
        with ops.using(flags):
            y = block(Owned(x.clone()))
            assert isinstance(getattr(y, GN_STATS_ATTR), ts.TileStats)
            got = ops.group_norm_op(y, 32, norm.weight, norm.bias, 1e-6, silu=True)
        assert [c[1:] for c in fake_epilogue] == [(False, True), (True, True)]
        with ops.using(flags.replace(igemm_conv=False)):
            y0 = block(Owned(x.clone()))
            want = ops.group_norm_op(y0, 32, norm.weight, norm.bias, 1e-6, silu=True)
    assert len(fake_epilogue) == 2
    torch.testing.assert_close(y.float(), y0.float(), atol=3e-2, rtol=3e-3)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-3)


@needs_interpreter
def test_split_conv_residual_goes_to_the_partial_sum(monkeypatch, tmp_path):
    """A UNet-style conv2 whose plain table entry is a Gluon K split: conv_epilogue_op runs it with the residual
    (the partial sum adds bias and residual, no statistics) where the next GroupNorm takes its own statistics in
    one launch, and declines where the closing pass would hand statistics over, or for the statistics kind."""
    from types import SimpleNamespace

    from speedsd.kernels import add_gn_stats

    x, wt, bias, r = make(2, 128, 8, 8, 128)
    cfg = cg.GluonConvConfig.parse("g8x8n128k64s4c1e1sk2p")
    key = conv_table.shape_key(tuple(x.shape), 128, 3, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    card = conv_table.card_name(torch.device("cpu"))
    path.write_text(json.dumps({"cards": {card: {key: {"best": "gluon", "config": str(cfg)}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    conv_table._epilogue_table.cache_clear()
    launches = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None):  # the whole conv in partial 0, zeros after
        launches.append((cfg, bias, residual, part, tuple(y.shape), y.dtype))
        y.zero_()
        y[0].copy_(F.conv2d(x.float(), weight.float(), padding=1).permute(0, 2, 3, 1))

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).half().to(memory_format=CL)
    conv.weight.data = wt
    on = ops.Flags(igemm_conv=True, fused_epilogues=True, group_norm=True)
    try:
        with ops.using(on):
            y = ops.conv_epilogue_op(x, conv, bias, r, 32)
            assert launches == [(cfg, None, None, None, (2, 2, 8, 8, 128), torch.float32)]
            want = F.conv2d(x.float(), wt.float(), bias.float(), padding=1) + r.float()
            torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-3)
            assert not hasattr(y, GN_STATS_ATTR)
            assert ops.conv_epilogue_op(x, conv, bias, None, 32) is None  # statistics: not from a split
            with monkeypatch.context() as m:  # a GroupNorm plan whose statistics the closing pass would write
                m.setattr(add_gn_stats, "plan_for", lambda *a: SimpleNamespace(path="rows"))
                assert ops.conv_epilogue_op(x, conv, bias, r, 32) is None
                assert ops.conv_epilogue_op(x, conv, bias, r, None) is not None  # no GroupNorm reader
        with ops.using(on.replace(igemm_conv=False)):
            assert ops.conv_epilogue_op(x, conv, bias, r, 32) is None
        stride2 = torch.nn.Conv2d(128, 128, 3, stride=2, padding=1).half()
        assert conv_table.split_residual_config(tuple(x.shape), stride2, None, x.dtype, x.device) is None
        assert len(launches) == 2
    finally:
        conv_table._table.cache_clear()
        conv_table._epilogue_table.cache_clear()


@pytest.fixture
def split_table(tmp_path, monkeypatch):
    """A conv table on this machine's card naming a Gluon K split for the 128 -> 128 conv at 2x8x8, and a fake
    sm_90 launch that writes the whole conv into partial 0 and zeros into the others (their sum is the conv)."""
    cfg = cg.GluonConvConfig.parse("g8x8n128k64s4c1e1sk2p")
    key = conv_table.shape_key((2, 128, 8, 8), 128, 3, 1, 1, torch.float16)
    path = tmp_path / "conv_table.json"
    card = conv_table.card_name(torch.device("cpu"))
    path.write_text(json.dumps({"cards": {card: {key: {"best": "gluon", "config": str(cfg)}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    launches = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None):
        launches.append((cfg, bias, residual, part, tuple(y.shape), y.dtype))
        y.zero_()
        y[0].copy_(F.conv2d(x.float(), weight.float(), padding=1).permute(0, 2, 3, 1))

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    yield cfg, launches
    conv_table._table.cache_clear()


@needs_interpreter
def test_conv_norm_silu_op_reads_the_partials(split_table, monkeypatch):
    """A K-split conv followed by GroupNorm+SiLU with a [N, C] pre-add: one conv launch writing partials, then
    GroupNorm reading them (no sum launch, no fp16 conv output); None where it does not apply."""

    cfg, launches = split_table
    x, wt, _, _ = make(2, 128, 8, 8, 128)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).half().to(memory_format=CL)
    conv.weight.data = wt
    norm = torch.nn.GroupNorm(32, 128, eps=1e-6).half()
    norm.weight.data.uniform_(0.8, 1.2)
    norm.bias.data.uniform_(-0.2, 0.2)
    add = (torch.randn(2, 128, generator=torch.Generator().manual_seed(3)) + 0.3).half()
    summed = []
    monkeypatch.setattr(cg, "sum_partials", lambda *a, **k: summed.append(a))
    on = ops.Flags(igemm_conv=True, fused_epilogues=True, group_norm=True)
    with ops.using(on):
        y = ops.conv_norm_silu_op(x, conv, norm, add)
    assert launches == [(cfg, None, None, None, (2, 2, 8, 8, 128), torch.float32)] and not summed
    h = F.conv2d(x.float(), wt.float(), padding=1) + add.float()[:, :, None, None]
    want = F.silu(F.group_norm(h, 32, norm.weight.float(), norm.bias.float(), 1e-6))
    torch.testing.assert_close(y.float(), want, atol=5e-3, rtol=5e-3)
    for flags in (on.replace(group_norm=False), on.replace(igemm_conv=False), on.replace(fused_epilogues=False)):
        with ops.using(flags):
            assert ops.conv_norm_silu_op(x, conv, norm, add) is None
    with ops.using(on):
        assert ops.conv_norm_silu_op(x[:1], conv, norm, add[:1]) is None  # no split in the table for batch 1
        monkeypatch.setattr(ops, "partials_plan", lambda *a: None)  # GroupNorm would not run it in one launch
        assert ops.conv_norm_silu_op(x, conv, norm, add) is None
    assert len(launches) == 1


@needs_interpreter
def test_unet_resnet_block_with_split_convs(split_table):
    """A UNet ResNet block (time embedding) whose conv1 and conv2 are K splits: conv1's partials go straight to
    norm2, conv2's partial sum adds bias and residual; the same values as the block with cuDNN's convs."""
    _, launches = split_table
    torch.manual_seed(0)
    block = ResnetBlock2D(128, 128, 32, groups=32, eps=1e-6).half().to(memory_format=CL).eval()
    for p in block.parameters():
        p.data.add_(0.05)
    x = make(2, 128, 8, 8, 128)[0]
    temb = torch.randn(2, 32).half()
    flags = ops.Flags(igemm_conv=True, fused_epilogues=True, group_norm=True, channels_last=True)
    with torch.inference_mode():
        with ops.using(flags):
            y = block(x, temb)
        assert [launch[4] for launch in launches] == [(2, 2, 8, 8, 128)] * 2  # conv1 and conv2, partials
        with ops.using(flags.replace(igemm_conv=False)):
            y0 = block(x, temb)
    torch.testing.assert_close(y.float(), y0.float(), atol=3e-2, rtol=3e-3)


# ---- GPU (sm_90) -------------------------------------------------------------------------------------


def _require_hopper() -> None:
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and cg._kernels()):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")


SHAPES = [  # (N, C, H, W, Co), config
    pytest.param((1, 128, 512, 512, 128), "g16x16n128k64s4c2e2p", id="vae-512-128to128"),
    pytest.param((1, 256, 256, 256, 256), "g8x16n256k64s4c2e2p", id="vae-256-256to256"),
    pytest.param((1, 512, 128, 128, 512), "g8x16n256k64s4c2e2p", id="vae-128-512to512"),
    pytest.param((1, 512, 64, 64, 512), "g8x16n128k64s4c1e1", id="vae-64-512to512"),
    pytest.param((1, 64, 12, 20, 128), "g16x16n128k64s4c2e2p", id="edge-tiles-16x16"),
    pytest.param((2, 128, 9, 17, 256), "g8x16n256k64s4c2e2p", id="B2-edge-tiles-8x16"),
    # tiles of bn + bn1 channels (per-channel statistics): the UNet's conv2 at 64² and 32², its 64-channel-slab
    # variant, two tiles across Co with edge tiles, bn1 narrower than bk
    pytest.param((2, 320, 64, 64, 320), "g8x8n256+64k64s4c1e2p", id="unet64-bn256+64-e2"),
    pytest.param((2, 320, 64, 64, 320), "g8x8n256+64k64s4c1e4p", id="unet64-bn256+64-e4"),
    pytest.param((2, 640, 32, 32, 640), "g8x8n128+32k64s5c1e1p", id="unet32-bn128+32"),
    pytest.param((2, 128, 9, 13, 320), "g8x8n128+32k64s5c1e1p", id="B2-edge-tiles-bn128+32-two-tiles"),
    pytest.param((1, 64, 11, 8, 160), "g8x8n64+16k64s4c1e1p", id="edge-tiles-bn64+16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["stats", "residual", "residual+stats"])
@pytest.mark.parametrize("shape, key", SHAPES)
def test_gpu_epilogue(shape, key, epilogue):
    _require_hopper()
    torch.backends.cudnn.allow_tf32 = False
    n, c, h, w, co = shape
    x, wt, bias, r = make(n, c, h, w, co, device="cuda")
    res = r if "residual" in epilogue else None
    groups = 32 if "stats" in epilogue else None
    out = torch.full((n, co, h, w), float("nan"), device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    y = cg.conv3x3_gluon(x, wt, bias, key, out=out, residual=res, stats_groups=groups)
    torch.cuda.synchronize()
    assert y is out and not y.isnan().any(), "unwritten outputs"
    ref = F.conv2d(x.float(), wt.float(), bias.float(), padding=1) + (0 if res is None else r.float())
    unfused = F.conv2d(x, wt, bias, padding=1) + (0 if res is None else r)  # cuDNN fp16, then an fp16 add
    err, err16 = (y.float() - ref).abs().max().item(), (unfused.float() - ref).abs().max().item()
    assert err <= 2 * err16, (err, err16)
    if groups is None:
        assert not hasattr(y, GN_STATS_ATTR)
        return
    cfg = cg.GluonConvConfig.parse(key)
    stats = getattr(y, GN_STATS_ATTR)
    if cfg.bn1:
        assert stats.per_channel
        want = ts.chan_stats_ref(y, cfg.th, cfg.tw, cfg.warps)
    else:
        want = ts.tile_stats_ref(y, groups, cfg.th, cfg.tw, cfg.warps)
    assert torch.equal(stats.part[2].cpu(), want[2].cpu())  # the counts
    torch.testing.assert_close(stats.part[0].cpu(), want[0].cpu(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.part[1].cpu(), want[1].cpu(), atol=1e-3, rtol=2e-5)
    gw, gb = (torch.randn(co, device="cuda") * 0.2 + 1).half(), (torch.randn(co, device="cuda") * 0.2).half()
    with ops.using(ops.Flags(group_norm=True)):
        got = ops.group_norm_op(y, groups, gw, gb, 1e-6, silu=True)
    assert not hasattr(y, GN_STATS_ATTR)
    want_gn = group_norm_ref(y.double(), groups, gw.double(), gb.double(), 1e-6, silu=True)
    own = group_norm_ref(y, groups, gw, gb, 1e-6, silu=True)  # torch's fp16 GroupNorm
    assert (got.double() - want_gn).abs().max() <= 2 * (own.double() - want_gn).abs().max() + 1e-3


@pytest.mark.gpu
def test_gpu_epilogue_in_cuda_graph():
    """Captured once, replayed on new inputs: output and statistics follow the inputs."""
    _require_hopper()
    shape = (1, 256, 64, 64, 256)
    x, wt, bias, r = make(*shape, device="cuda")
    gw, gb = torch.ones(256, device="cuda").half(), torch.zeros(256, device="cuda").half()

    def step():
        y = cg.conv3x3_gluon(x, wt, bias, "ws2", residual=r, stats_groups=32)
        return ops.group_norm_op(y, 32, gw, gb, 1e-6, silu=True)

    with torch.inference_mode(), ops.using(ops.Flags(group_norm=True)):
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for seed in (1, 2):
            nx, _, _, nr = make(*shape, device="cuda", seed=seed)
            x.copy_(nx)
            r.copy_(nr)
            graph.replay()
            torch.cuda.synchronize()
            ref = F.conv2d(x.float(), wt.float(), bias.float(), padding=1) + r.float()
            want = F.silu(F.group_norm(ref, 32, eps=1e-6))
            assert (out.float() - want).abs().max().item() < 2e-2, seed


SPLIT_NORM_CASES = [  # (N, C, H, W, Co), config, GroupNorm plan knobs: the UNet's K-split conv1s (16², 8², the
    # plan GroupNorm picks there) and an odd shape with the one-launch plan forced
    pytest.param((2, 1280, 16, 16, 1280), "g8x16n128k64s5c1e1sk3p", {}, id="unet16-1280-split3"),
    pytest.param((2, 1280, 8, 8, 1280), "g8x8n128k64s5c1e1sk5p", {}, id="unet8-1280-split5"),
    pytest.param((2, 2560, 8, 8, 1280), "g8x8n128k64s5c1e1sk6p", {}, id="unet8-2560-split6"),
    pytest.param((2, 1280, 8, 8, 1280), "g8x8b2n128k64s5c1e1sk10p", {}, id="unet8-1280-tb2-split10"),  # the table's
    pytest.param((2, 2560, 8, 8, 1280), "g8x8b2n128k64s5c1e1sk10p", {}, id="unet8-2560-tb2-split10"),
    pytest.param((2, 320, 13, 21, 128), "g8x16n128k64s4c1e1sk4p", {"gb": 1}, id="odd-edge-tiles-split4"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, key, knobs", SPLIT_NORM_CASES)
def test_gpu_group_norm_from_split_partials(shape, key, knobs):
    """SiLU(GroupNorm(conv + add[n, c])) from the split's partials (never summed to fp16) vs fp32: at most 2x the
    error of the path it replaces (cuDNN's fp16 conv, then the GroupNorm kernel with the same pre-add)."""
    from speedsd.kernels.group_norm import group_norm
    from speedsd.kernels.group_norm_partials import group_norm_partials

    _require_hopper()
    n, c, h, w, co = shape
    x, wt, _, _ = make(n, c, h, w, co, device="cuda", seed=co + h)
    g = torch.Generator().manual_seed(h)
    add = (torch.randn(n, co, generator=g) + 0.3).cuda()
    gw = (torch.rand(co, generator=g) * 0.4 + 0.8).half().cuda()
    gb = (torch.randn(co, generator=g) * 0.2).half().cuda()
    parts = cg.conv3x3_gluon_partials(x, wt, key)
    y = group_norm_partials(parts, (n, co, h, w), 32, gw, gb, 1e-6, True, add=add, **knobs)
    torch.cuda.synchronize()
    assert y is not None and not y.isnan().any()
    ref = F.conv2d(x.float(), wt.float(), padding=1) + add[:, :, None, None]
    want = F.silu(F.group_norm(ref, 32, gw.float(), gb.float(), 1e-6))
    old = group_norm(F.conv2d(x, wt, padding=1), 32, gw, gb, 1e-6, True, add=add)
    err, err_old = (y.float() - want).abs().max().item(), (old.float() - want).abs().max().item()
    assert err <= 2 * err_old, (err, err_old)
