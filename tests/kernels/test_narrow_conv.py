"""conv3x3_narrow (3x3 conv to <= 8 channels, optional GroupNorm+SiLU prologue) vs torch's conv in fp64.

Runs under the Triton interpreter on CPU: small and odd shapes (H, W not multiples of the tiles, C not a
multiple of 16, Co 1..8, batch 2), both methods (fused one-kernel, two-pass), every float dtype, with and
without the prologue and the bias, into NaN-poisoned outputs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from interp_bounds import bounds_checked, needs_interpreter
from precision import INTERPRET, assert_low_precision_ok

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

nc = importlib.import_module("speedsd.kernels.narrow_conv")

pytestmark = pytest.mark.usefixtures("one_thread")

# (label, (N, C, Co, H, W))
SHAPES = [
    ("vae-like 1x32->3 9x13", (1, 32, 3, 9, 13)),
    ("batch 2 2x16->4 7x5", (2, 16, 4, 7, 5)),
    ("Co=8 2x48->8 6x11", (2, 48, 8, 6, 11)),
    ("C=20 not /16 1x20->3 5x6", (1, 20, 3, 5, 6)),
    ("one row 1x16->3 1x9", (1, 16, 3, 1, 9)),
    ("Co=1 many tiles 1x16->1 14x17", (1, 16, 1, 14, 17)),
]
SHAPE_IDS = [s[0] for s in SHAPES]
# small tiles, so the test shapes span several programs (and every tile edge case)
CONFIGS = [
    ("fused 8x8", nc.NarrowConvConfig(tile_h=8, tile_w=8, block_k=16)),
    ("two-pass", nc.NarrowConvConfig(method="two_pass", block_m=16, block_p=32, block_k=16)),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]
# (label, GroupNorm+SiLU prologue, bias)
VARIANTS = [("plain", False, False), ("bias", False, True), ("gn-silu", True, False), ("gn-silu+bias", True, True)]
GROUPS = 4
BF16_ULP = 2.0**-7


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 convs on a GPU must be IEEE fp32 (cuDNN allows TF32 by default)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


def _randn(shape, dtype=torch.float32, mean=0.5, std=2.0):
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype).to(DEVICE)


def _gn_affine(x: torch.Tensor, groups: int = GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(x)·γ + β as x·scale + shift: fp32 [N, C] scale, shift from fp32 group statistics."""
    n, c = x.shape[:2]
    xg = x.float().reshape(n, groups, -1)  # [N, C, H, W] -> [N, G, C/G·H·W]
    mean, var = xg.mean(-1), xg.var(-1, unbiased=False)
    rstd = torch.rsqrt(var + 1e-6)
    gamma, beta = _randn((c,), mean=1.0, std=0.5).float(), _randn((c,), mean=0.1, std=0.5).float()
    scale = rstd.repeat_interleave(c // groups, 1) * gamma  # [N, G] -> [N, C]
    shift = beta - mean.repeat_interleave(c // groups, 1) * scale
    return scale, shift


def _problem(shape, dtype, prologue, with_bias, layout=torch.channels_last):
    n, c, co, h, w = shape
    x = _randn((n, c, h, w), dtype).contiguous(memory_format=layout)
    weight = _randn((co, c, 3, 3), dtype, mean=0.02, std=1 / (3 * c**0.5))  # y ~ O(1)
    bias = _randn((co,), dtype, mean=0.3, std=1.0) if with_bias else None
    kw = dict(zip(("scale", "shift"), _gn_affine(x)), silu=True) if prologue else {}
    return x, weight, bias, kw


def _ref64(x, weight, bias, kw):
    b64 = None if bias is None else bias.double()
    return nc.conv3x3_narrow_ref(x.double(), weight.double(), b64, **kw)


def _trunc_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounding toward zero (what the interpreter's cast does), as fp64."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).double()


def _interp_bf16_ref(x, weight, bias, kw):
    """The fp64 conv of the activation the interpreter feeds tl.dot: the fp32 prologue truncated to bf16."""
    a = x.float() * kw["scale"][:, :, None, None] + kw["shift"][:, :, None, None]
    a = _trunc_bf16(torch.nn.functional.silu(a))
    return nc.conv3x3_narrow_ref(a, weight.double(), None if bias is None else bias.double())


def _poisoned(x, co, layout=torch.channels_last):
    n, _, h, w = x.shape
    return torch.full((n, co, h, w), float("nan"), dtype=x.dtype, device=DEVICE).contiguous(memory_format=layout)


def _check(y, x, weight, bias, kw):
    ref = _ref64(x, weight, bias, kw)
    assert y.shape == ref.shape and y.dtype == x.dtype and not torch.isnan(y).any()
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        return
    if INTERPRET and x.dtype == torch.bfloat16 and kw:
        # the interpreter truncates the prologue's fp32 -> bf16 (the GPU rounds): the kernel must match
        # that activation's exact conv to one bf16 ulp (its own output truncation)
        emul = _interp_bf16_ref(x, weight, bias, kw)
        torch.testing.assert_close(y.double(), emul, rtol=BF16_ULP, atol=1e-5)
        return
    assert_low_precision_ok(y, ref, nc.conv3x3_narrow_ref(x, weight, bias, **kw))  # torch in this dtype


@pytest.mark.parametrize("variant,prologue,with_bias", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("cname,config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=SHAPE_IDS)
def test_matches_torch_conv(label, shape, cname, config, dtype, dname, variant, prologue, with_bias):
    x, weight, bias, kw = _problem(shape, dtype, prologue, with_bias)
    out = _poisoned(x, shape[2])
    y = nc.conv3x3_narrow(x, weight, bias, out=out, config=config, **kw)
    assert y is out
    _check(y, x, weight, bias, kw)


@pytest.mark.parametrize(
    "cname,config",
    [("default", None), ("fused 4x16 k32", nc.NarrowConvConfig(tile_h=4, tile_w=16, block_k=32)),
     ("fused 16x4 k64 s1", nc.NarrowConvConfig(tile_h=16, tile_w=4, block_k=64, stages=1))],
    ids=["default", "fused 4x16 k32", "fused 16x4 k64 s1"],
)  # fmt: skip
@pytest.mark.parametrize("dtype,dname", DTYPES[:2], ids=[d for _, d in DTYPES[:2]])
@pytest.mark.parametrize("label,shape", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
def test_other_tiles(label, shape, dtype, dname, cname, config):
    x, weight, bias, kw = _problem(shape, dtype, True, True)
    y = nc.conv3x3_narrow(x, weight, bias, config=config, **kw)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _check(y, x, weight, bias, kw)


@pytest.mark.parametrize("cname,config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype,dname", DTYPES[:2], ids=[d for _, d in DTYPES[:2]])
@pytest.mark.parametrize("label,shape", [SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[1], SHAPE_IDS[3]])
def test_nchw_input_and_output(label, shape, dtype, dname, cname, config):
    x, weight, bias, kw = _problem(shape, dtype, True, True, layout=torch.contiguous_format)
    y = nc.conv3x3_narrow(x, weight, bias, config=config, **kw)
    assert y.is_contiguous()  # x's memory format
    _check(y, x, weight, bias, kw)
    out = _poisoned(x, shape[2], layout=torch.channels_last)  # any out strides
    _check(nc.conv3x3_narrow(x, weight, bias, out=out, config=config, **kw), x, weight, bias, kw)


@pytest.mark.parametrize("part", ["affine only", "silu only"])
@pytest.mark.parametrize("cname,config", CONFIGS, ids=CONFIG_IDS)
def test_prologue_parts(cname, config, part):
    x, weight, bias, kw = _problem(SHAPES[1][1], torch.float32, True, True)
    kw = {"scale": kw["scale"], "shift": kw["shift"]} if part == "affine only" else {"silu": True}
    y = nc.conv3x3_narrow(x, weight, bias, out=_poisoned(x, weight.shape[0]), config=config, **kw)
    _check(y, x, weight, bias, kw)


@pytest.mark.parametrize("cname,config", CONFIGS, ids=CONFIG_IDS)
def test_padding_is_zero_after_the_prologue(cname, config):
    """scale 0, shift 3: the activation is silu(3) on the image and 0 off it, so a border output has
    fewer taps than an interior one (a kernel padding with silu(shift) would make them all equal)."""
    x, weight, _, _ = _problem((1, 16, 3, 6, 7), torch.float32, False, False)
    scale, shift = torch.zeros(1, 16, device=DEVICE), torch.full((1, 16), 3.0, device=DEVICE)
    y = nc.conv3x3_narrow(x, weight, scale=scale, shift=shift, silu=True, config=config)
    ref = nc.conv3x3_narrow_ref(x.double(), weight.double(), scale=scale, shift=shift, silu=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[..., 0, 0], ref[..., 3, 3])  # the check above can tell them apart


@needs_interpreter
@pytest.mark.parametrize(
    "cname,config",
    CONFIGS + [("fused 16x16 k64 (GPU tile)", nc.FUSED_16x16), ("two-pass GPU", nc.TWO_PASS)],
    ids=CONFIG_IDS + ["fused 16x16 GPU", "two-pass GPU"],
)
def test_in_bounds(cname, config):
    """Every active lane (halo pixels off the image, K and N tails) addresses its own tensors."""
    x, weight, bias, kw = _problem((2, 20, 3, 5, 19), torch.float16, True, True)
    with bounds_checked() as checked:
        y = nc.conv3x3_narrow(x, weight, bias, config=config, **kw)
    assert checked[0] > 0
    _check(y, x, weight, bias, kw)


def test_default_config():
    cpu = torch.device("cpu")  # picks as for an H100's 132 SMs
    assert nc.default_config(1, 128, 3, 512, 512, cpu) == nc.TWO_PASS_K32  # measured fastest on SD's shapes
    assert nc.default_config(2, 320, 4, 64, 64, cpu) == nc.TWO_PASS_K32
    assert nc.default_config(1, 16, 3, 5, 5, cpu).block_k == 16
    assert nc.fused_config(1, 512, 512, 3, cpu) == nc.FUSED_16x16  # 1369 tiles: the least halo
    assert nc.fused_config(2, 64, 64, 4, cpu).tile_h == 8  # 16x16: 50 programs, 8x8: 242
    assert nc.fused_config(2, 64, 64, 4, cpu).maxnreg is None  # Co = 4: Z 64 columns wide


def _bad_calls():
    x = _randn((1, 16, 4, 4), torch.float16)
    w = _randn((3, 16, 3, 3), torch.float16)
    s = torch.ones(1, 16, device=DEVICE)
    return [
        ("Co > 8", lambda: nc.conv3x3_narrow(x, _randn((9, 16, 3, 3), torch.float16))),
        ("5x5 kernel", lambda: nc.conv3x3_narrow(x, _randn((3, 16, 5, 5), torch.float16))),
        ("dtype mismatch", lambda: nc.conv3x3_narrow(x, w.float())),
        ("integer x", lambda: nc.conv3x3_narrow(x.to(torch.int32), w.to(torch.int32))),
        ("bias shape", lambda: nc.conv3x3_narrow(x, w, torch.ones(4, device=DEVICE))),
        ("scale without shift", lambda: nc.conv3x3_narrow(x, w, scale=s)),
        ("scale shape", lambda: nc.conv3x3_narrow(x, w, scale=s[:, :8], shift=s[:, :8])),
        ("out shape", lambda: nc.conv3x3_narrow(x, w, out=torch.empty(1, 4, 4, 4, device=DEVICE).half())),
        ("tile not 2^k", lambda: nc.conv3x3_narrow(x, w, config=nc.NarrowConvConfig(tile_h=12))),
        ("block_k < 16", lambda: nc.conv3x3_narrow(x, w, config=nc.NarrowConvConfig(block_k=8))),
        ("method", lambda: nc.conv3x3_narrow(x, w, config=nc.NarrowConvConfig(method="winograd"))),
    ]


@pytest.mark.parametrize("label", [b[0] for b in _bad_calls()])
def test_rejects(label):
    fn = dict(_bad_calls())[label]
    with pytest.raises(ValueError, match="conv3x3_narrow|bias|scale|out"):
        fn()
