"""The fused projection + residual add + LayerNorm (linear_add_ln.py here) vs fp64 torch (interpreter on
CPU, the GPU where there is one): (s, y) within 2x of what the unfused fp16 engine (cuBLAS GEMM, then
add + LayerNorm) makes, on labelled real and odd shapes and the tile configs; its refusals; its AOT compile."""

from __future__ import annotations

import linear_add_ln as lal
import pytest
import torch

from precision import INTERPRET, assert_low_precision_ok  # tests/precision.py (run with PYTHONPATH=src:tests:.)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (label, M, K, N): N = NA + NB (a power of two and 0 or a smaller power of two); M not a multiple of the tile
SHAPES = [
    ("odd M=37 K=40 N=24 (16+8)", 37, 40, 24),
    ("N=40 (32+8) K=32", 64, 32, 40),
    ("N=16 (one part) M=19", 19, 48, 16),
    ("UNet-structure N=320 (256+64) M=70", 70, 64, 320),
]
# small tiles keep the interpreter fast and the shapes multi-tile; the Hopper tiles run on the GPU below
CONFIGS = [(16, 16, 4, 2), (32, 32, 4, 3)]
GPU_SHAPES = [("unet 64² M=8192 K=320 N=320", 8192, 320, 320), ("odd M=1000 K=96 N=320", 1000, 96, 320)]


def _inputs(m, k, n, dtype, mean=0.3):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    f64 = dict(dtype=torch.float64, generator=g)
    h = torch.randn(m, k, **f64) + mean
    w = torch.randn(n, k, **f64) * k**-0.5 + 0.02
    r = torch.randn(m, n, **f64) * 2 + mean
    vecs = [torch.randn(n, **f64) * 0.5 + 0.1 for _ in range(3)] + [
        torch.randn(n, **f64) * 0.2 + 1,
        torch.randn(n, **f64),
    ]
    return [t.to(dtype).to(DEVICE) for t in (h, w, r, *vecs)]


def _check(m, k, n, dtype, config, biases):
    h, w, r, db, sb, xb, lw, lb = _inputs(m, k, n, dtype)
    kw = dict(zip(("delta_bias", "s_bias", "x_bias"), (db, sb, xb)))
    kw = {key: v for key, v in kw.items() if key in biases}
    poisoned = tuple(torch.full_like(r, float("nan")) for _ in range(2))
    s, y = lal.linear_add_layer_norm(r, h, w, lw, lb, 1e-5, config=config, out=poisoned, **kw)
    assert s is poisoned[0] and y is poisoned[1] and not (torch.isnan(s).any() or torch.isnan(y).any())
    ref64 = lal.linear_add_layer_norm_ref(
        r.double(), h.double(), w.double(), lw.double(), lb.double(), 1e-5, **{key: v.double() for key, v in kw.items()}
    )
    unfused = lal.linear_add_layer_norm_ref(r, h, w, lw, lb, 1e-5, **kw)
    for ours, want, theirs in zip((s, y), ref64, unfused):
        assert ours.shape == want.shape and ours.dtype == dtype
        assert_low_precision_ok(ours, want, theirs)


@pytest.mark.parametrize("config", CONFIGS, ids=["16x16w4s2", "32x32w4s3"])
@pytest.mark.parametrize("biases", [(), ("delta_bias", "s_bias", "x_bias")], ids=["plain", "all-biases"])
@pytest.mark.parametrize("label,m,k,n", SHAPES, ids=[s[0] for s in SHAPES])
def test_fp16_within_2x_unfused(label, m, k, n, biases, config):
    _check(m, k, n, torch.float16, config, biases)


@pytest.mark.skipif(
    INTERPRET, reason="triton 3.6's interpreter tl.dot multiplies bf16 operands' raw bits (a 16x16 dot is off by ~1e10)"
)
def test_bf16_and_no_affine():
    h, w, r, db, *_ = _inputs(37, 40, 24, torch.bfloat16)
    s, y = lal.linear_add_layer_norm(r, h, w, None, None, 1e-5, db, config=CONFIGS[0])
    ref_s, ref_y = lal.linear_add_layer_norm_ref(r.double(), h.double(), w.double(), None, None, 1e-5, db.double())
    unf_s, unf_y = lal.linear_add_layer_norm_ref(r, h, w, None, None, 1e-5, db)
    assert_low_precision_ok(s, ref_s, unf_s)
    assert_low_precision_ok(y, ref_y, unf_y)


def test_leading_dims_and_new_outputs():
    h, w, r, *_ = _inputs(2 * 9, 32, 40, torch.float16)
    h3, r3 = h.view(2, 9, 32), r.view(2, 9, 40)  # [B, N, C] token tensors, as the transformer passes them
    s, y = lal.linear_add_layer_norm(r3, h3, w, None, None, config=CONFIGS[0])
    assert s.shape == y.shape == (2, 9, 40) and s.data_ptr() != r3.data_ptr()
    ref_s, ref_y = lal.linear_add_layer_norm_ref(r3.double(), h3.double(), w.double(), None, None)
    assert_low_precision_ok(y, ref_y, lal.linear_add_layer_norm_ref(r3, h3, w, None, None)[1])


@pytest.mark.parametrize(
    "n,expect", [(320, (256, 64)), (256, (256, 0)), (24, (16, 8)), (640, None), (48, (32, 16)), (36, None), (4, None)]
)
def test_split_n(n, expect):
    assert lal.split_n(n) == expect


@pytest.mark.parametrize(
    "case,match",
    [
        ("n640", "N=640"),
        ("fp32", "fp16/bf16"),
        ("k-misaligned", "16-byte aligned"),
        ("weight-shape", "expects r"),
        ("leading", "leading dims"),
        ("vec", "must be a float"),
        ("out", "out must be"),
    ],
)
def test_refusals(case, match):
    h, w, r, db, *_ = _inputs(8, 32, 40, torch.float16)
    args = dict(r=r, h=h, weight=w, ln_weight=None, ln_bias=None)
    if case == "n640":
        z = dict(dtype=torch.float16, device=DEVICE)
        args.update(r=torch.zeros(8, 640, **z), weight=torch.zeros(640, 32, **z))
    elif case == "fp32":
        args.update(r=r.float(), h=h.float(), weight=w.float())
    elif case == "k-misaligned":
        z = dict(dtype=torch.float16, device=DEVICE)
        args.update(h=torch.zeros(8, 36, **z)[:, :30], weight=torch.zeros(40, 30, **z))
    elif case == "weight-shape":
        args.update(weight=w[:, :16])
    elif case == "leading":
        args.update(h=h[:4])
    elif case == "vec":
        args.update(ln_weight=db[:8])
    elif case == "out":
        args.update(out=(torch.empty_like(r), torch.empty_like(r).t()))
    assert not lal.supported(args["r"], args["h"], args["weight"]) or case in ("vec", "out")
    with pytest.raises(ValueError, match=match):
        lal.linear_add_layer_norm(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [None, (64, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)], ids=str)
@pytest.mark.parametrize("label,m,k,n", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_hopper_tiles(label, m, k, n, config):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need sm_90")
    _check(m, k, n, torch.float16, config, ("delta_bias", "x_bias", "s_bias"))
