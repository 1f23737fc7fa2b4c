"""Two-source GroupNorm (``group_norm(x, ..., concat=skip)``): GroupNorm(+SiLU) of cat([x, skip], dim=1)
without forming it, on every path and both layouts, against fp64 torch on the concatenation, and bit for bit
against the one-source kernel on the materialized concatenation.

Shapes keep the UNet up path's structure (C1 + C2 with groups straddling C1) scaled down, plus odd ones.
Runs under the Triton interpreter on CPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gn = importlib.import_module("speedsd.kernels.group_norm")  # the module (the package exports the function)

# (label, (N, C1, C2, H, W), groups)
SHAPES = [
    # SD's 1280 + 640 with 32 groups of 60: group 21 takes 20 channels of x and 40 of the skip. Scaled: 6 a group
    ("sd-up 1280+640 G32 as 2x(32+16)x4x4 G8", (2, 32, 16, 4, 4), 8),
    # SD's 1280 + 1280 -> 2560 (80 a group): the boundary on a group edge
    ("sd-up 1280+1280 G32 as 1x(40+40)x3x5 G8", (1, 40, 40, 3, 5), 8),
    ("odd C1=13 (not k*CPG) C2=3 HW=35 1x16x5x7 G4", (1, 13, 3, 5, 7), 4),
    ("odd C2=1 2x(11+1)x3x3 G3", (2, 11, 1, 3, 3), 3),
]
# label -> launcher arguments; small tiles / program counts force several tiles and chunks
PATHS = {
    "auto": {"path": "auto"},
    "fused-gb2": {"path": "fused", "gb": 2},
    "loop": {"path": "loop", "tile": 32},
    "split": {"path": "split", "tile": 32, "programs": 5},
    "split-blocks": {"path": "split", "tile": 32, "programs": 5, "grouped": False, "warps": 2},
}
LAYOUTS = ["nchw", "channels_last"]


def _pair(dims, layout, dtype=torch.float32):
    n, c1, c2, h, w = dims
    x, s = ((torch.randn(n, c, h, w, dtype=torch.float64) * 2 + 0.5).to(dtype) for c in (c1, c2))
    if layout == "channels_last":
        x, s = x.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return x.to(DEVICE), s.to(DEVICE)


def _affine(c, dtype=torch.float32):
    return (torch.randn(c) * 0.5 + 1.0).to(dtype).to(DEVICE), (torch.randn(c) * 0.5).to(dtype).to(DEVICE)


def _poisoned(x, s):
    cat = torch.cat([x, s], dim=1)  # the expected shape and layout (torch.cat keeps a shared memory format)
    return torch.full_like(cat, float("nan"))


def _run(x, s, groups, w, b, silu, path, add=None):
    out = _poisoned(x, s)
    y = gn.group_norm(x, groups, w, b, 1e-5, silu, add=add, out=out, concat=s, **PATHS[path])
    assert y is out
    return y


def _ref64(x, s, groups, w, b, silu=True, add=None):
    cat = torch.cat([x, s], dim=1).double()
    f = lambda t: None if t is None else t.double()
    return gn.group_norm_ref(cat, groups, f(w), f(b), 1e-5, silu, add=f(add))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("label,dims,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_reference_fp32_and_one_source_bit_for_bit(label, dims, groups, path, layout):
    x, s = _pair(dims, layout)
    w, b = _affine(dims[1] + dims[2])
    y = _run(x, s, groups, w, b, True, path)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(y.double(), _ref64(x, s, groups, w, b), atol=2e-5, rtol=2e-5)
    one = gn.group_norm(torch.cat([x, s], dim=1), groups, w, b, 1e-5, True, **PATHS[path])
    assert torch.equal(y, one)  # the same plan and arithmetic: only the loads differ


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize(
    "dtype,atol,rtol",
    [(torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)],
    ids=["fp16", "bf16"],
)
def test_low_precision_error_within_2x_torch(dtype, atol, rtol, path, layout):
    dims, groups = (2, 24, 16, 6, 7), 4  # 10 channels a group: group 2 straddles C1 = 24
    x, s = _pair(dims, layout, dtype)
    w, b = _affine(40, dtype)
    ref = _ref64(x, s, groups, w, b)
    y = _run(x, s, groups, w, b, True, path)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    assert_low_precision_ok(y, ref, gn.group_norm_ref(torch.cat([x, s], dim=1), groups, w, b, 1e-5, True))


@pytest.mark.parametrize("path", ["auto", "split"])
def test_pre_add_and_no_affine(path):
    dims, groups = (2, 20, 12, 3, 5), 4
    x, s = _pair(dims, "channels_last")
    add = (torch.randn(2, 32) * 2 + 0.5).to(DEVICE)
    y = _run(x, s, groups, None, None, False, path, add=add)
    torch.testing.assert_close(y.double(), _ref64(x, s, groups, None, None, False, add), atol=2e-5, rtol=2e-5)


def test_mixed_layouts_and_default_out():
    """A channels_last x with an NCHW skip: both read as NCHW (x copied), the output NCHW and new."""
    x, _ = _pair((1, 12, 4, 5, 3), "channels_last")
    _, s = _pair((1, 12, 4, 5, 3), "nchw")
    w, b = _affine(16)
    y = gn.group_norm(x, 4, w, b, silu=True, concat=s)
    assert y.shape == (1, 16, 5, 3) and y.is_contiguous()
    torch.testing.assert_close(y.double(), _ref64(x, s, 4, w, b), atol=2e-5, rtol=2e-5)


def test_never_concatenates(monkeypatch):
    x, s = _pair((2, 20, 12, 4, 4), "channels_last")
    want = _ref64(x, s, 4, None, None)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called")

    monkeypatch.setattr(torch, "cat", no_cat)
    for path in ("auto", "split"):
        y = gn.group_norm(x, 4, silu=True, concat=s, **PATHS[path])
        torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=2e-5)


def test_bad_arguments_raise():
    x, s = _pair((2, 12, 4, 4, 4), "nchw")
    with pytest.raises(ValueError, match="divide"):
        gn.group_norm(x, 5, concat=s)
    with pytest.raises(ValueError, match="weight"):
        gn.group_norm(x, 4, torch.ones(12, device=DEVICE), concat=s)  # C1 entries, not C1 + C2
    with pytest.raises(ValueError, match="concat must be"):
        gn.group_norm(x, 4, concat=s[:, :, :3])
    with pytest.raises(ValueError, match="concat must be"):
        gn.group_norm(x, 4, concat=s.half())
    with pytest.raises(ValueError, match="out must be a dense"):
        gn.group_norm(x, 4, concat=s, out=torch.empty_like(x))
    buf = torch.empty(2 * 28 * 16, device=DEVICE)  # x, then an output starting on x's last sample
    xa = buf[: 2 * 12 * 16].view(2, 12, 4, 4).copy_(x)
    with pytest.raises(ValueError, match="overlap"):
        gn.group_norm(xa, 4, concat=s, out=buf[12 * 16 : 12 * 16 + 2 * 16 * 16].view(2, 16, 4, 4))
    out = buf[2 * 12 * 16 :].view(2, 16, 4, 4)  # adjacent, not overlapping: fine
    torch.testing.assert_close(gn.group_norm(xa, 4, concat=s, out=out).double(), _ref64(x, s, 4, None, None, False))


def test_one_channel_source_is_concatenated_not_read_in_place(monkeypatch):
    """A one-channel source is dense in both layouts; reading it in place compiled to another register layout
    on the GPU (other rounding than the one-source kernel), so group_norm forms the concatenation for it."""
    x, s = _pair((2, 11, 1, 3, 3), "channels_last")
    w, b = _affine(12)
    want = gn.group_norm(torch.cat([x, s], dim=1), 3, w, b, 1e-5, True)
    calls = []
    real = gn._dual_args
    monkeypatch.setattr(gn, "_dual_args", lambda *a: calls.append(1) or real(*a))
    got = gn.group_norm(x, 3, w, b, 1e-5, True, concat=s)
    assert calls == [] and torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    x3, s3 = _pair((2, 9, 3, 3, 3), "channels_last")
    gn.group_norm(x3, 3, *_affine(12), 1e-5, True, concat=s3)
    assert calls == [1]  # wider sources are read in place
