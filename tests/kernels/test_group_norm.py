"""Fused GroupNorm(+SiLU) kernel vs torch, on every path (one-tile, two-sweep loop, split), both layouts,
with and without a per-(sample, channel) pre-add.

Runs under the Triton interpreter on CPU: shapes are small but keep SD's ratios and odd sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from precision import assert_low_precision_ok

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


gn = importlib.import_module("speedsd.kernels.group_norm")  # the module (the package exports the function)
group_norm, group_norm_ref, plan_group_norm = gn.group_norm, gn.group_norm_ref, gn.plan_group_norm

# (label, shape, groups)
SHAPES = [
    ("sd-ratio 1x64x8x8 G32", (1, 64, 8, 8), 32),
    ("odd C48 G4 3x48x7x5", (3, 48, 7, 5), 4),
    ("odd 2x40x9x11 G4", (2, 40, 9, 11), 4),
    ("odd C96 G32 3x96x7x5", (3, 96, 7, 5), 32),
]
# label -> launcher arguments; small tiles/program counts force multi-tile loops and many chunks.
# channels_last "split" is the grouped whole-row kernel pair; "split-blocks" the group-block one.
PATHS = {
    "auto": {"path": "auto"},
    "loop": {"path": "loop", "tile": 64},
    "split": {"path": "split", "tile": 64, "programs": 6},
    "split-blocks": {"path": "split", "tile": 64, "programs": 6, "grouped": False, "warps": 2},
}
LAYOUTS = ["nchw", "channels_last"]


def _input(shape, layout, dtype=torch.float32, mean=2.0, std=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(DEVICE)


def _affine(c, dtype=torch.float32):
    w = (torch.randn(c) * 0.5 + 1.0).to(dtype).to(DEVICE)
    b = (torch.randn(c) * 0.5).to(dtype).to(DEVICE)
    return w, b


def _ref64(x, groups, w, b, eps=1e-5, silu=False, add=None):
    w64 = None if w is None else w.double()
    b64 = None if b is None else b.double()
    a64 = None if add is None else add.double()
    return group_norm_ref(x.double(), groups, w64, b64, eps, silu, add=a64)


def _run(x, groups, w, b, silu, path, add=None):
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y = group_norm(x, groups, w, b, 1e-5, silu, add=add, out=out, **PATHS[path])
    assert y is out
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_reference_fp32(label, shape, groups, path, layout):
    if groups == 32 and shape[1] == 96 and path != "auto":
        pytest.skip("96 group programs: too slow for the interpreter on the streaming paths")
    x = _input(shape, layout)
    w, b = _affine(shape[1])
    y = _run(x, groups, w, b, True, path)
    assert torch.isfinite(y).all()
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(y.double(), _ref64(x, groups, w, b, silu=True), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both-nosilu"])
def test_affine_and_silu_variants(affine, path, layout):
    shape, groups = (2, 24, 5, 6), 4
    x = _input(shape, layout)
    w, b = _affine(shape[1])
    w = w if affine in ("weight", "both-nosilu") else None
    b = b if affine in ("bias", "both-nosilu") else None
    silu = affine != "both-nosilu"
    y = _run(x, groups, w, b, silu, path)
    torch.testing.assert_close(y.double(), _ref64(x, groups, w, b, silu=silu), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_large_mean_small_std_needs_stable_variance(path):
    """mean 300, std 0.1: E[x²]−E[x]² in fp32 loses the variance entirely; ours must not."""
    shape, groups = (2, 16, 9, 7), 4
    x = _input(shape, "nchw", mean=300.0, std=0.1)
    ref = _ref64(x, groups, None, None)
    # the naive formula really fails here (so this test can catch it)
    xg = x.reshape(2, groups, -1)
    naive_var = (xg * xg).mean(-1) - xg.mean(-1) ** 2
    true_var = x.double().reshape(2, groups, -1).var(-1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 0.05
    y = _run(x, groups, None, None, False, path)
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_within_2x_torch(dtype, path, layout):
    shape, groups = (2, 40, 6, 7), 4
    x = _input(shape, layout, dtype=dtype)
    w, b = _affine(shape[1], dtype)
    ref = _ref64(x, groups, w, b, silu=True)
    y = _run(x, groups, w, b, True, path)
    assert y.dtype == dtype
    assert_low_precision_ok(y, ref, group_norm_ref(x, groups, w, b, 1e-5, True))


def test_fp32_weights_with_fp16_input():
    x = _input((2, 16, 5, 5), "nchw", dtype=torch.float16)
    w, b = _affine(16)
    y = _run(x, 4, w, b, True, "auto")
    torch.testing.assert_close(y.double(), _ref64(x, 4, w, b, silu=True), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize(
    "label,shape", [("3d [N,C,L]", (2, 12, 11)), ("2d [N,C]", (3, 8)), ("5d", (1, 8, 3, 2, 3))], ids=lambda v: str(v)
)
def test_other_ranks(label, shape):
    x = (torch.randn(shape) * 2 + 0.5).to(DEVICE)
    w, b = _affine(shape[1])
    y = _run(x, 4, w, b, False, "auto")
    torch.testing.assert_close(y.double(), _ref64(x, 4, w, b), atol=2e-5, rtol=2e-5)


def test_non_dense_input_and_default_out():
    x = _input((2, 16, 6, 10), "nchw")[..., ::2]  # strided view: copied to dense first
    w, b = _affine(16)
    y = group_norm(x, 4, w, b, silu=True)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), _ref64(x, 4, w, b, silu=True), atol=2e-5, rtol=2e-5)


def test_bad_arguments_raise():
    x = _input((2, 12, 4, 4), "nchw")
    with pytest.raises(ValueError, match="divide"):
        group_norm(x, 5)
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 4, torch.ones(11, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        group_norm(x, 4, out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="path"):
        group_norm(x, 4, path="nope")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        group_norm(x.double(), 4)
    with pytest.raises(ValueError, match="fused"):
        group_norm(_input((1, 512, 64, 64), "nchw"), 32, path="fused")


@pytest.mark.parametrize(
    "shape,channels_last,path",
    [
        ((2, 1280, 8, 8), False, "fused"),  # UNet 8²: the group sits in registers, one launch
        ((2, 1280, 8, 8), True, "fused"),
        ((2, 1280, 16, 16), False, "fused"),
        ((2, 320, 64, 64), False, "fused"),  # 10 rows of 4096 = 8 + 2 row blocks in registers
        ((2, 1280, 32, 32), False, "fused"),  # 40 rows of 1024 = 32 + 8
        ((2, 640, 64, 64), False, "split"),  # 64 groups for 132 SMs: split the statistics
        ((2, 320, 64, 64), True, "split"),
        ((1, 128, 512, 512), False, "split"),  # VAE: 1M-element groups
        ((64, 320, 64, 64), False, "fused"),  # big batch, group fits: one tile per group
        ((64, 640, 64, 64), False, "loop"),  # big batch: enough programs for one launch per group
    ],
)
def test_plan_picks_path_for_sd_shapes(shape, channels_last, path):
    n, c, h, w = shape
    plan = plan_group_norm(n, c, h * w, 32, channels_last, 2, sm_count=132)
    assert plan.path == path
    assert plan.launches == (2 if path == "split" else 1)
    if path == "split":
        assert plan.chunks * plan.n_cb * n >= 132  # enough programs to fill the card
    if path == "fused" and not channels_last:  # the group's rows in two power-of-two blocks, little padding
        ra, rb = plan.rows
        assert ra <= c // 32 <= ra + rb and (ra + rb) <= 1.1 * (c // 32) + 8
    if channels_last and path == "split":  # whole pixel rows: [position, group, channel] tiles
        assert plan.grouped and plan.gb == 32 and plan.block_k >= c // 32
    elif channels_last:  # several whole groups per program, rows of whole 16-byte vectors
        assert plan.gb * (c // 32) * 2 % 16 == 0 and plan.gb * (c // 32) <= plan.block_c


def test_tuned_table_entries_are_valid_plans():
    """Every measured entry must be a plan the launcher can build (a bad paste from the bench fails here)."""
    for (n, c, s, g, cl, itemsize), knobs in gn.TUNED.items():
        knobs = dict(knobs)
        plan = plan_group_norm(n, c, s, g, cl, itemsize, 132, str(knobs.pop("path")), **knobs)
        assert plan.path in ("fused", "loop", "split", "rows")


def test_unknown_knob_raises():
    with pytest.raises(TypeError, match="tiles"):
        group_norm(_input((1, 8, 2, 2), "nchw"), 4, tiles=3)


def test_ops_dispatch_uses_kernel():
    from speedsd import ops

    x = _input((1, 16, 4, 4), "nchw")
    w, b = _affine(16)
    with ops.using(ops.Flags(group_norm=True)):
        y = ops.group_norm_op(x, 4, w, b, 1e-6, silu=True)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 4, w, b, 1e-6)), atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 640, 32, 32), (2, 2560, 8, 8), (1, 128, 512, 512)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_sd_shapes_fp16_gpu(shape, layout):
    x = _input(shape, layout, dtype=torch.float16)
    w, b = _affine(shape[1], torch.float16)
    ref = _ref64(x, 32, w, b, silu=True)
    y = _run(x, 32, w, b, True, "auto")
    assert_low_precision_ok(y, ref, group_norm_ref(x, 32, w, b, 1e-5, True))


# ---- pre-add: GroupNorm(x + add[n, c]) (a ResNet block's conv bias + time embedding) -------------

# (label, add shape "NC" | "C", add dtype (None: x's), silu, x dtype). Every (shape, path, layout) gets
# both add shapes, silu on and off, fp32 and fp16 (+ bf16 on "auto"): the full cross takes ~4 min.
ADDS = [
    ("NC-fp32", "NC", None, False, "fp32"),
    ("C-fp32add-silu-fp16", "C", torch.float32, True, "fp16"),
    ("NC-silu-bf16", "NC", None, True, "bf16"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _add(n, c, kind, dtype):
    a = torch.randn(n, c, dtype=torch.float64) * 2 + 1.0  # non-zero mean, differs per channel and sample
    return (a if kind == "NC" else a[0]).to(dtype).to(DEVICE)


@pytest.mark.parametrize("add_label,kind,add_dtype,silu,dtype", ADDS, ids=[a[0] for a in ADDS])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_pre_add_matches_reference(label, shape, groups, path, layout, add_label, kind, add_dtype, silu, dtype):
    if groups == 32 and shape[1] == 96 and path != "auto":
        pytest.skip("96 group programs: too slow for the interpreter on the streaming paths")
    if dtype == "bf16" and path != "auto":
        pytest.skip("bf16: the one-tile kernels suffice (interpreter time)")
    dtype = DTYPES[dtype]
    x = _input(shape, layout, dtype=dtype)
    w, b = _affine(shape[1], dtype)
    add = _add(shape[0], shape[1], kind, add_dtype or dtype)
    x0 = x.clone()
    y = _run(x, groups, w, b, silu, path, add=add)
    assert torch.equal(x, x0)  # x itself is never modified
    ref = _ref64(x, groups, w, b, silu=silu, add=add)  # fp64 GroupNorm(x + add)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    else:
        assert y.dtype == dtype
        assert_low_precision_ok(y, ref, group_norm_ref(x, groups, w, b, 1e-5, silu, add=add))


@pytest.mark.parametrize("path", ["auto", "split"])
def test_pre_add_enters_the_statistics(path):
    """A per-channel add that dominates x: a kernel adding it only after the statistics is far off."""
    shape, groups = (2, 16, 5, 7), 4
    x = _input(shape, "nchw")
    add = (torch.arange(32, dtype=torch.float32).reshape(2, 16) * 3 - 20).to(DEVICE)
    ref = _ref64(x, groups, None, None, add=add)
    assert (ref - _ref64(x, groups, None, None)).abs().max() > 1.0  # the add really matters here
    torch.testing.assert_close(_run(x, groups, None, None, False, path, add=add).double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(PATHS))
def test_pre_add_large_offset_small_spread(path, layout):
    """x std 0.1 plus an add of ~300 that spreads the channels by ~0.05: the kernels never round x + add,
    and the spread of the shifted channel means must survive the fp32 statistics."""
    shape, groups = (2, 16, 9, 7), 4
    x = _input(shape, layout, mean=0.0, std=0.1)
    add = (300 + torch.randn(2, 16) * 0.05).to(DEVICE)
    ref = _ref64(x, groups, None, None, add=add)
    y = _run(x, groups, None, None, False, path, add=add)
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", ["expanded", "strided", "n1"])
def test_pre_add_views(form, layout):
    """[N, C] adds that are views: sample stride 0 (expanded [C]), channel stride 2, and N = 1."""
    n = 1 if form == "n1" else 3
    shape, groups = (n, 24, 5, 6), 4
    x = _input(shape, layout)
    base = _add(n, 48, "NC", torch.float32)
    add = {"expanded": base[0, :24].expand(n, 24), "strided": base[:, ::2], "n1": base[:, :24]}[form]
    y = _run(x, groups, None, None, True, "auto", add=add)
    torch.testing.assert_close(y.double(), _ref64(x, groups, None, None, silu=True, add=add), atol=2e-5, rtol=2e-5)


def test_pre_add_bad_arguments_raise():
    x = _input((2, 12, 4, 4), "nchw")
    for bad in (torch.ones(11), torch.ones(3, 12), torch.ones(2, 12, 1), torch.ones(2, 12, dtype=torch.int32)):
        with pytest.raises(ValueError, match="add must be"):
            group_norm(x, 4, add=bad.to(DEVICE))
    with pytest.raises(ValueError, match="add must be"):
        group_norm(x, 4, add=torch.ones(12, device="meta"))


# ---- in place (out=x): ResnetBlock2D's norm2 over conv1's output, the VAE decoder's norm1 over its input


@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "pre-add"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(PATHS))
def test_in_place_is_bit_identical(path, layout, with_add):
    """Every kernel (one-tile rows / blocks, two-sweep loop, split, grouped split) over its own input."""
    shape, groups = (2, 24, 5, 7), 4
    x = _input(shape, layout)
    w, b = _affine(shape[1])
    add = _add(shape[0], shape[1], "NC", torch.float32) if with_add else None
    want = group_norm(x, groups, w, b, 1e-5, True, add=add, **PATHS[path])
    y = group_norm(x, groups, w, b, 1e-5, True, add=add, out=x, **PATHS[path])
    assert y is x and torch.equal(y, want)


def test_ops_in_place_only_where_the_kernel_writes():
    from speedsd import ops

    x = _input((2, 16, 4, 6), "channels_last")
    w, b = _affine(16)
    want = F.silu(F.group_norm(x, 4, w, b, 1e-6))
    with ops.using(ops.Flags(group_norm=True)):
        x1 = x.clone()
        y = ops.group_norm_op(x1, 4, w, b, 1e-6, silu=True, inplace=True)
        assert y is x1
        torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
        x2 = _input((2, 16, 4, 12), "nchw")[..., ::2]  # not dense: the kernel reads a copy, x2 stays
        x2_before = x2.clone()
        y = ops.group_norm_op(x2, 4, w, b, 1e-6, silu=True, inplace=True)
        assert y is not x2 and torch.equal(x2, x2_before)
        torch.testing.assert_close(y, F.silu(F.group_norm(x2, 4, w, b, 1e-6)), atol=2e-5, rtol=2e-5)
    x3 = x.clone()
    y = ops.group_norm_op(x3, 4, w, b, 1e-6, silu=True, inplace=True)  # the reference: a new tensor
    assert y is not x3 and torch.equal(x3, x) and torch.equal(y, want)
