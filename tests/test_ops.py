"""speedsd.ops dispatch of the sub-pixel upsample conv: when it applies, that it equals nearest-2x +
3x3 conv, and that its folded weight follows in-place weight updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forced_plans import force_plans
from interp_bounds import needs_interpreter
from speedsd import ops
from speedsd.models.layers import Conv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(c: int) -> Conv2d:
    conv = Conv2d(c, c, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (3 * c**0.5))
        conv.bias.copy_(torch.randn(c, generator=g) + 0.5)
    return conv


def _want(x: torch.Tensor, conv: Conv2d) -> torch.Tensor:
    return F.conv2d(
        F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(), conv.bias.double(), padding=1
    )


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_subpixel_path_matches_upsample_conv(monkeypatch, channels_last: bool) -> None:
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 6 * 5)
    conv = _conv(8)
    x = torch.randn(2, 8, 6, 5) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    real = ops.subpixel_upsample_conv
    monkeypatch.setattr(ops, "subpixel_upsample_conv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with ops.using(ops.Flags(subpixel_upsample=True)):
        got = ops.upsample_conv_op(x, conv)
        assert len(calls) == 1
        small = ops.upsample_conv_op(x[:, :, :5], conv)  # 25 < 30 pixels: the plain path
        assert len(calls) == 1
    assert got.shape == (2, 8, 12, 10)
    torch.testing.assert_close(got.double(), _want(x, conv), atol=2e-5, rtol=2e-5)
    with ops.using(ops.Flags()):
        torch.testing.assert_close(small, ops.upsample_conv_op(x[:, :, :5], conv), atol=0, rtol=0)


def test_folded_weight_follows_in_place_updates(monkeypatch) -> None:
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)
    conv = _conv(4)
    x = torch.randn(1, 4, 4, 4) + 0.5
    with ops.using(ops.Flags(subpixel_upsample=True)):
        before = ops.upsample_conv_op(x, conv)
        with torch.no_grad():
            conv.weight.mul_(-2.0)  # bumps weight._version: the fold must be redone
        after = ops.upsample_conv_op(x, conv)
    torch.testing.assert_close(before.double(), _want(x, _conv(4)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(after.double(), _want(x, conv), atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_loop_scope_folds_small_upsamplers_once_and_drops_the_fold(monkeypatch) -> None:
    """Below SUBPIXEL_MIN_PIXELS the phase form runs only inside ops.loop_scope: its weight is folded once
    there (not again on the next call, again after an in-place update), never kept on the module, and
    released when the scope ends; inputs under SUBPIXEL_LOOP_MIN_PIXELS stay plain inside it too."""
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 10**9)
    monkeypatch.setattr(ops, "SUBPIXEL_LOOP_MIN_PIXELS", 4 * 4)
    conv = _conv(4)
    x = torch.randn(2, 4, 4, 5) * 2 + 0.5
    convs, folds = [], []
    real_conv, real_fold = ops.subpixel_upsample_conv, ops.subpixel_weight
    monkeypatch.setattr(ops, "subpixel_upsample_conv", lambda *a, **kw: convs.append(1) or real_conv(*a, **kw))
    monkeypatch.setattr(ops, "subpixel_weight", lambda w: folds.append(1) or real_fold(w))
    with ops.using(ops.Flags(subpixel_upsample=True)):
        outside = ops.upsample_conv_op(x, conv)
        assert (len(convs), len(folds)) == (0, 0)
        with ops.loop_scope():
            a = ops.upsample_conv_op(x, conv)
            b = ops.upsample_conv_op(x, conv)
            assert (len(convs), len(folds)) == (2, 1)
            small = ops.upsample_conv_op(x[:, :, :3], conv)  # 15 < 16 pixels: plain
            assert len(convs) == 2
            with torch.no_grad():
                conv.weight.mul_(-2.0)
            c = ops.upsample_conv_op(x, conv)
            assert (len(convs), len(folds)) == (3, 2)
            assert len(ops._loop_weights) == 1
        assert ops._loop_weights is None
        assert not hasattr(conv, "_speedsd_subpixel")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a.double(), _want(x, _conv(4)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outside.double(), _want(x, _conv(4)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(small.double(), _want(x[:, :, :3], _conv(4)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(c.double(), _want(x, conv), atol=2e-5, rtol=2e-5)


def test_loop_scopes_nest_and_restore() -> None:
    assert ops._loop_weights is None
    with ops.loop_scope():
        outer = ops._loop_weights
        with ops.loop_scope():
            assert ops._loop_weights is not outer and ops._loop_weights == {}
        assert ops._loop_weights is outer
    assert ops._loop_weights is None


def test_subpixel_without_interpreter_uses_torch_interleave(monkeypatch) -> None:
    """On a CPU without the Triton interpreter the flag still works (torch's strided interleave)."""
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conv = _conv(4)
    x = torch.randn(1, 4, 3, 5) + 0.5
    with ops.using(ops.Flags(subpixel_upsample=True)):
        got = ops.upsample_conv_op(x, conv)
    torch.testing.assert_close(got.double(), _want(x, conv), atol=2e-5, rtol=2e-5)


# ---- norm_silu_conv_op: the output heads ----------------------------------------------------------


def _head(c: int, co: int, groups: int) -> tuple[torch.nn.GroupNorm, Conv2d]:
    g = torch.Generator().manual_seed(1)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    conv = Conv2d(c, co, 3, padding=1)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g) * 0.5 + 1.0)
        norm.bias.copy_(torch.randn(c, generator=g) * 0.5)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (3 * c**0.5))
        conv.bias.copy_(torch.randn(co, generator=g) + 0.5)
    return norm, conv


HEAD_FLAGS = {  # label -> (flags, the narrow conv runs, GroupNorm is folded into it)
    "reference": (ops.Flags(), False, False),
    "group_norm": (ops.Flags(group_norm=True), False, False),
    "narrow": (ops.Flags(igemm_conv=True), True, False),
    "narrow+fold": (ops.Flags(igemm_conv=True, group_norm=True), True, True),
}


@needs_interpreter
@pytest.mark.parametrize("label", list(HEAD_FLAGS))
def test_norm_silu_conv_op_paths(monkeypatch, label: str) -> None:
    """Every flag set draws conv(silu(GroupNorm(x))); the narrow conv and the fold run where they should
    (the fold never normalises x in memory: group_norm_op must not run)."""
    force_plans(monkeypatch, path="split", tile=64, programs=6)
    flags, narrow, fold = HEAD_FLAGS[label]
    norm, conv = _head(32, 3, 8)
    x = (torch.randn(2, 32, 9, 7) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    want = F.conv2d(
        F.silu(F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)),
        conv.weight.double(),
        conv.bias.double(),
        padding=1,
    )
    calls = {"narrow": 0, "gn": 0}
    real_narrow, real_gn = ops.conv3x3_narrow, ops.group_norm_op
    monkeypatch.setattr(ops, "conv3x3_narrow", lambda *a, **k: calls.__setitem__("narrow", 1) or real_narrow(*a, **k))
    monkeypatch.setattr(ops, "group_norm_op", lambda *a, **k: calls.__setitem__("gn", 1) or real_gn(*a, **k))
    with ops.using(flags):
        got = ops.norm_silu_conv_op(x, norm, conv)
    assert calls == {"narrow": int(narrow), "gn": int(not fold)}
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_norm_silu_conv_op_keeps_cudnn_for_wide_or_strided_convs(monkeypatch) -> None:
    norm, _ = _head(16, 3, 4)
    wide = Conv2d(16, 9, 3, padding=1)  # 9 > MAX_CO output channels
    strided = Conv2d(16, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 16, 6, 6) + 0.5
    monkeypatch.setattr(ops, "conv3x3_narrow", lambda *a, **k: pytest.fail("narrow conv on an unsupported conv"))
    with ops.using(ops.Flags(igemm_conv=True, group_norm=True)):
        for conv in (wide, strided):
            want = conv(F.silu(F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)))
            torch.testing.assert_close(ops.norm_silu_conv_op(x, norm, conv), want, atol=2e-5, rtol=2e-5)
