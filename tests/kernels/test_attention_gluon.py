"""Gluon d=40 / 80 / 160 self-attention (kernels/attention_gluon.py).

CPU: the launcher's contract (it takes exactly the fused-QKV views Attention.forward makes, returns None
for other valid input, raises ValueError for invalid input), the plumbing to the kernel with the device
check and the launch faked, the supported sizes and query tiles, and ops.attention_op's "gluon" mode
falling back to SDPA (the sm_90 ahead-of-time compile: test_attention_gluon_aot.py). Gluon kernels do
not run under the interpreter, so every numerical check of the kernel is a GPU test (sm_90 only): accuracy
against fp64 SDPA within 2x torch fp16 SDPA's error on NaN-poisoned outputs (partial 256-row query tiles
included), the fallbacks, and the SD level-0 Attention layer replayed from a CUDA graph.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from speedsd import attention_table, ops
from speedsd.kernels import attention_gluon as ag
from speedsd.models.layers import Attention


def fused(B: int, H: int, N: int, D: int = 40, dtype=torch.float16, device="cpu", seed=0, qkv=None):
    """q, k, v as Attention.forward makes them with fused QKV: head-split column blocks of one qkv."""
    if qkv is None:
        g = torch.Generator().manual_seed(seed)
        qkv = (torch.randn(B, N, 3 * H * D, generator=g) * 1.5 + 0.3).to(device, dtype)  # [B, N, 3·H·D]
    return tuple(t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # 3 x [B, H, N, D]


def heads(t: torch.Tensor, H: int) -> torch.Tensor:
    return t.unflatten(-1, (H, -1)).transpose(1, 2)  # [B, N, H·D] -> [B, H, N, D]


B, H, N, D = 2, 4, 256, 40  # CPU layout cases (N: four key tiles, one query tile)


def _separate():
    return tuple(heads(torch.randn(B, N, H * D).half(), H) for _ in range(3))


def _interleaved():
    qkv = torch.randn(B, N, H, 3, D).half()  # per-head [q | k | v]
    return tuple(qkv[:, :, :, i].transpose(1, 2) for i in range(3))


def _wider():
    return fused(B, H, N, qkv=torch.randn(B, N, 4 * H * D).half()[..., : 3 * H * D])


def _misaligned():
    buf = torch.randn(B * N * 3 * H * D + 8).half()
    return fused(B, H, N, qkv=buf[1 : 1 + B * N * 3 * H * D].view(B, N, 3 * H * D))


def _two_tensors():
    q, _, _ = fused(B, H, N, seed=1)
    _, k, v = fused(B, H, N, seed=2)
    return q, k, v


def _batch_second():
    qkv = torch.randn(N, B, 3 * H * D).half().transpose(0, 1)  # [B, N, 3HD] view of an [N, B, 3HD]
    return fused(B, H, N, qkv=qkv)


LAYOUTS = [
    pytest.param(lambda: fused(B, H, N), True, id="fused-qkv"),
    pytest.param(lambda: fused(1, H, N), True, id="fused-qkv-B1"),
    pytest.param(lambda: fused(B, H, N, qkv=torch.randn(3, N, 3 * H * D).half()[1:]), True, id="fused-batch-slice"),
    pytest.param(_separate, False, id="separate-projections"),
    pytest.param(lambda: (lambda q, k, v: (q, v, k))(*fused(B, H, N)), False, id="k-v-swapped"),
    pytest.param(lambda: (lambda q, k, v: (k, q, v))(*fused(B, H, N)), False, id="q-k-swapped"),
    pytest.param(_interleaved, False, id="per-head-interleaved"),
    pytest.param(_wider, False, id="columns-of-wider-buffer"),
    pytest.param(lambda: tuple(t.contiguous() for t in fused(B, H, N)), False, id="contiguous-copies"),
    pytest.param(_misaligned, False, id="misaligned-base"),
    pytest.param(_two_tensors, False, id="q-from-another-qkv"),
    pytest.param(_batch_second, False, id="batch-second-storage"),
]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an sm_90 device: the launch computes the reference from the qkv block it is handed."""
    calls = []

    def launch(qkv2d, out, n, h, qk_c, cfg):
        calls.append(dict(qkv2d=qkv2d, n=n, h=h, qk_c=qk_c, cfg=cfg))
        d = qkv2d.shape[1] // (3 * h)
        q, k, v = fused(qkv2d.shape[0] // n, h, n, D=d, qkv=qkv2d.view(-1, n, qkv2d.shape[1]))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=qk_c / ag.LOG2E)
        out.copy_(ref.transpose(1, 2).flatten(2))  # [B, H, N, D] -> [B, N, H·D]

    monkeypatch.setattr(ag, "_device_ok", lambda device: True)
    monkeypatch.setattr(ag, "_launch", launch)
    return calls


@pytest.mark.parametrize("make, ok", LAYOUTS)
def test_layout_check_takes_exactly_fused_qkv_views(make, ok, fake_gpu):
    q, k, v = make()
    assert ag.fused_qkv_views(q, k, v) is ok
    out = ag.attention_gluon(q, k, v)
    assert (out is not None) is ok and len(fake_gpu) == int(ok)
    if ok:
        torch.testing.assert_close(out, ag.attention_gluon_ref(q, k, v), atol=0, rtol=0)


def test_attention_layer_hands_over_fused_views(monkeypatch):
    """The views Attention.forward passes with fused_qkv pass the check; without fused_qkv they do not."""
    seen = []
    monkeypatch.setattr(ops, "attention_op", lambda q, k, v, **kw: seen.append((q, k, v)) or q.clone())
    layer = Attention(320, heads=8, dim_head=40).half()
    x = torch.randn(2, 128, 320).half() + 0.5
    for fused_qkv in (True, False):
        with torch.inference_mode(), ops.using(ops.Flags(attention="gluon", fused_qkv=fused_qkv)):
            layer(x)
        assert ag.fused_qkv_views(*seen[-1]) is fused_qkv


def test_launcher_plumbing(fake_gpu):
    q, k, v = fused(2, 3, 384)
    poisoned = torch.full((2, 384, 120), float("nan"), dtype=torch.float16)
    res = ag.attention_gluon(q, k, v, scale=0.3, out=poisoned)
    (call,) = fake_gpu
    qkv2d = call["qkv2d"]
    assert qkv2d.data_ptr() == q.data_ptr() and qkv2d.shape == (768, 360) and qkv2d.stride() == (360, 1)
    assert call["n"] == 384 and call["h"] == 3 and call["cfg"] == ag.HOPPER_D40
    assert math.isclose(call["qk_c"], 0.3 * ag.LOG2E)
    assert res.shape == (2, 3, 384, 40) and res.data_ptr() == poisoned.data_ptr()
    flat = res.transpose(1, 2).flatten(2)  # the caller's [B, H, N, D] -> [B, N, H·D]: a free view
    assert flat.is_contiguous() and flat.data_ptr() == poisoned.data_ptr()
    assert not poisoned.isnan().any()
    torch.testing.assert_close(res, ag.attention_gluon_ref(q, k, v, scale=0.3), atol=0, rtol=0)
    fresh = ag.attention_gluon(q, k, v)  # no out: a new contiguous [B, N, H·D]
    assert fresh.transpose(1, 2).flatten(2).is_contiguous() and fresh.data_ptr() != poisoned.data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: fused(B, H, N, dtype=torch.float32), id="fp32"),
        pytest.param(lambda: fused(B, H, N, dtype=torch.bfloat16), id="bf16"),
        pytest.param(lambda: fused(B, 5, N, D=64), id="d64"),
        pytest.param(lambda: fused(B, H, N, D=128), id="d128"),
        pytest.param(lambda: fused(B, H, N, D=48), id="d48"),
        pytest.param(lambda: fused(B, H, 200), id="N200-not-a-key-tile-multiple"),
        pytest.param(lambda: fused(B, H, 96), id="N96-not-a-key-tile-multiple"),
        pytest.param(lambda: fused(B, H, 32), id="N32-below-a-key-tile"),
        pytest.param(lambda: (fused(B, H, 128)[0], *fused(B, H, N)[1:]), id="cross-attention"),
    ],
)
def test_unsupported_problems_return_none(make, fake_gpu):
    q, k, v = make()
    assert not ag._shape_ok(q, k)
    assert ag.attention_gluon(q, k, v) is None and not fake_gpu


@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(lambda q, k, v: (q[0], k[0], v[0]), "4-d", id="3d"),
        pytest.param(lambda q, k, v: (q, k[:, :2], v[:, :2]), "do not match", id="heads-differ"),
        pytest.param(lambda q, k, v: (q, k, v[:, :, :128]), "do not match", id="v-not-k"),
        pytest.param(lambda q, k, v: (q, k.float(), v), "dtypes differ", id="dtype-mismatch"),
        pytest.param(lambda q, k, v: (q, k.to("meta"), v.to("meta")), "devices differ", id="device-mismatch"),
        pytest.param(lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "zero keys", id="no-keys"),
    ],
)
def test_invalid_input_raises(args, match, fake_gpu):
    with pytest.raises(ValueError, match=match):
        ag.attention_gluon(*args(*fused(B, H, N)))
    assert not fake_gpu


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_scale_and_out_raise(scale, fake_gpu):
    q, k, v = fused(B, H, N)
    with pytest.raises(ValueError, match="scale"):
        ag.attention_gluon(q, k, v, scale=scale)
    for out in (torch.empty(B, H, N, D).half(), torch.empty(B, N, H * D), torch.empty(B, H * D, N).half().mT):
        with pytest.raises(ValueError, match="out must be"):
            ag.attention_gluon(q, k, v, out=out)
    assert not fake_gpu


@pytest.mark.parametrize(
    "d, n, tiles, block_n",
    [
        pytest.param(40, 64, 1, 64, id="d40-N64-one-key-tile"),
        pytest.param(40, 576, 3, 64, id="d40-N576-last-tile-64-rows"),
        pytest.param(40, 640, 3, 64, id="d40-N640-last-tile-128-rows"),
        pytest.param(40, 4096, 16, 64, id="d40-N4096-sd512"),
        pytest.param(40, 16384, 64, 64, id="d40-N16384-sd1024"),
        pytest.param(80, 64, 1, 64, id="d80-N64-one-key-tile"),
        pytest.param(80, 320, 3, 64, id="d80-N320-last-tile-64-rows"),
        pytest.param(80, 1024, 8, 128, id="d80-N1024-sd512"),
        pytest.param(80, 1280, 10, 128, id="d80-N1280-640x512"),
        pytest.param(80, 4096, 32, 128, id="d80-N4096-sd1024"),
        pytest.param(160, 64, 1, 64, id="d160-N64-sd512-mid"),
        pytest.param(160, 192, 3, 64, id="d160-N192"),
        pytest.param(160, 256, 4, 128, id="d160-N256-sd512"),
    ],
)
def test_supported_sizes_and_query_tiles(d, n, tiles, block_n):
    """Every multiple of 64 keys is taken (d=80/160: 128-key blocks where they divide N); query tiles (d=40:
    4 consumers x 64 rows, d=80: 2 x 64, d=160: 1 x 64) cover N."""
    q = torch.empty(2, 8, n, d, dtype=torch.float16, device="meta")
    cfg = ag.config_for(d, n)
    assert ag._shape_ok(q, q) and cfg.block_n == block_n and cfg.head_dim == d and n % cfg.block_n == 0
    assert cfg.block_m == {40: 256, 80: 128, 160: 64}[d]
    assert ag.launch_grid(2, 8, n, cfg) == (tiles, 16)
    assert (tiles - 1) * cfg.block_m < n <= tiles * cfg.block_m
    assert sum(cfg.boxes) >= d and all(w * 2 <= 128 for w in cfg.boxes)  # TMA box rows of <= 128 B


@pytest.mark.parametrize(
    "d, n, cfg",
    [
        (40, 384, ag.HOPPER_D40),
        (80, 384, ag.HOPPER_D80),
        (80, 320, ag.HOPPER_D80_BN64),
        (160, 256, ag.HOPPER_D160),
        (160, 192, ag.HOPPER_D160_BN64),
    ],
)
def test_launcher_picks_the_head_dims_instance(d, n, cfg, fake_gpu):
    q, k, v = fused(2, 3, n, D=d)
    res = ag.attention_gluon(q, k, v)
    (call,) = fake_gpu
    assert call["cfg"] == cfg and res.shape == (2, 3, n, d)
    torch.testing.assert_close(res, ag.attention_gluon_ref(q, k, v), atol=0, rtol=0)


def test_cpu_tensors_are_not_supported():
    q, k, v = fused(B, H, N)
    assert not ag.attention_gluon_supported(q, k)
    assert ag.attention_gluon(q, k, v) is None


# ---- dispatch --------------------------------------------------------------------------------------


def test_flags_accept_gluon():
    assert ops.Flags(attention="gluon").attention == "gluon" and "gluon" in ops.ATTENTION_MODES
    assert "gluon" in attention_table.CHOICES


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("upcast", [False, True], ids=["", "upcast"])
@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_attention_op_gluon_falls_back_on_cpu(dtype, upcast, layout):
    q, k, v = fused(2, 2, 128, dtype=dtype) if layout == "fused" else _separate()
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with ops.using(ops.Flags(attention="gluon")):
        got = ops.attention_op(q, k, v, upcast=upcast)
    with ops.using(ops.Flags(attention="sdpa")):
        want = ops.attention_op(q, k, v, upcast=upcast)
    assert torch.equal(got, want)
    ref = ag.attention_gluon_ref(q.double(), k.double(), v.double())
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_attention_op_returns_the_kernel_result(monkeypatch):
    """ "gluon" (as a flag or the table's choice under "auto") returns attention_gluon's tensor; None -> SDPA."""
    q, k, v = fused(2, 2, 128)
    marker = torch.zeros_like(q)
    result = [marker]
    monkeypatch.setattr(ops, "attention_gluon", lambda q, k, v, scale=None: result[0])
    monkeypatch.setattr(ops, "pick_attention", lambda q, k, upcast=False: "gluon")
    for mode in ("gluon", "auto"):
        with ops.using(ops.Flags(attention=mode)):
            assert ops.attention_op(q, k, v) is marker
            result[0] = None
            assert torch.equal(ops.attention_op(q, k, v), F.scaled_dot_product_attention(q, k, v))
            result[0] = marker


# ---- GPU (sm_90) -----------------------------------------------------------------------------------


def _require_hopper() -> None:
    if not (torch.cuda.get_device_capability() == (9, 0) and ag._kernels() is not None):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")


GPU_SHAPES = [
    pytest.param((2, 8, 4096, 40), id="d40-sd-level0-B2-H8-N4096"),
    pytest.param((1, 2, 16384, 40), id="d40-sd-1024px-N16384"),
    pytest.param((1, 8, 640, 40), id="d40-odd-N640-partial-query-tile"),
    pytest.param((2, 8, 576, 40), id="d40-odd-N576-last-tile-one-consumer"),
    pytest.param((3, 5, 384, 40), id="d40-odd-B3-H5-N384"),
    pytest.param((2, 8, 64, 40), id="d40-one-key-tile-N64"),
    pytest.param((2, 8, 1024, 80), id="d80-sd-level1-B2-H8-N1024"),
    pytest.param((1, 8, 4096, 80), id="d80-sd-1024px-N4096"),
    pytest.param((1, 8, 320, 80), id="d80-odd-N320-partial-query-tile"),
    pytest.param((3, 5, 192, 80), id="d80-odd-B3-H5-N192-64-key-blocks"),
    pytest.param((1, 3, 384, 80), id="d80-odd-B1-H3-N384-last-tile-one-consumer"),
    pytest.param((2, 8, 64, 80), id="d80-one-key-tile-N64"),
    pytest.param((2, 8, 256, 160), id="d160-sd-level2-B2-H8-N256"),
    pytest.param((2, 8, 64, 160), id="d160-sd-mid-N64"),
    pytest.param((1, 5, 192, 160), id="d160-odd-B1-H5-N192-64-key-blocks"),
    pytest.param((1, 8, 1024, 160), id="d160-sd-1024px-N1024"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale0.3"])
def test_gpu_matches_fp64_sdpa(shape, scale):
    _require_hopper()
    b, h, n, d = shape
    q, k, v = fused(b, h, n, D=d, device="cuda", seed=n + h)
    assert ag.attention_gluon_supported(q, k)
    out = torch.full((b, n, h * d), float("nan"), device="cuda", dtype=torch.float16)
    res = ag.attention_gluon(q, k, v, scale=scale, out=out)
    torch.cuda.synchronize()
    assert res is not None and res.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "unwritten outputs"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    err = (res.double() - ref).abs().max().item()
    err16 = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - ref).abs().max().item()
    assert err <= 2 * err16, (err, err16)


@pytest.mark.gpu
def test_gpu_fallbacks_and_table_dispatch(monkeypatch, tmp_path):
    _require_hopper()
    sep = tuple(t.cuda() for t in _separate())
    cases = {
        "separate": sep,
        "N200": fused(2, 8, 200, device="cuda"),
        "fp32": fused(2, 8, 256, dtype=torch.float32, device="cuda"),
        "cross": (fused(2, 8, 128, device="cuda")[0], *fused(2, 8, 256, device="cuda")[1:]),
    }
    for name, (q, k, v) in cases.items():
        assert ag.attention_gluon(q, k, v) is None, name
        with ops.using(ops.Flags(attention="gluon")):
            assert torch.equal(ops.attention_op(q, k, v), F.scaled_dot_product_attention(q, k, v)), name
    q, k, v = fused(2, 8, 4096, device="cuda")
    kernel = ag.attention_gluon(q, k, v)
    with ops.using(ops.Flags(attention="gluon")):
        assert torch.equal(ops.attention_op(q, k, v), kernel)  # the kernel, not the SDPA fallback
    table = {"self 4096 d40": {"q_shape": [2, 8, 4096, 40], "k_shape": [2, 8, 4096, 40], "best": "gluon"}}
    path = tmp_path / "attention_table.json"
    path.write_text(json.dumps({"cards": {torch.cuda.get_device_name(): table}}))
    monkeypatch.setattr(attention_table, "TABLE_PATH", path)
    attention_table._table.cache_clear()
    try:
        assert ops.pick_attention(q, k) == "gluon"
        with ops.using(ops.Flags(attention="auto")):
            assert torch.equal(ops.attention_op(q, k, v), kernel)
    finally:
        attention_table._table.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "channels, dim_head, tokens",
    [
        pytest.param(320, 40, 4096, id="level0-d40-64x64"),
        pytest.param(640, 80, 1024, id="level1-d80-32x32"),
        pytest.param(1280, 160, 256, id="level2-d160-16x16"),
    ],
)
def test_gpu_attention_layer_in_cuda_graph(monkeypatch, channels, dim_head, tokens):
    """SD level-0 / 1 / 2 self-attention (8 heads, 64x64 / 32x32 / 16x16 latent) with fused QKV, captured and
    replayed by GraphCache: "gluon" within 2x of "sdpa"'s error against the fp32 layer, kernel really used."""
    _require_hopper()
    from speedsd.graphs import GraphCache

    torch.manual_seed(0)
    layer = Attention(channels, heads=8, dim_head=dim_head)
    with torch.no_grad():
        layer.to_q.weight.mul_(4)  # peakier softmax than the default init gives
    layer32 = copy.deepcopy(layer).cuda()
    layer = layer.cuda().half()
    served = []
    real = ops.attention_gluon

    def counting(*args, **kw):
        out = real(*args, **kw)
        served.append(out is not None)
        return out

    monkeypatch.setattr(ops, "attention_gluon", counting)
    xs = [(torch.randn(2, tokens, channels, device="cuda") * (1 + i) + 0.5).half() for i in range(2)]
    outs = {}
    for mode in ("gluon", "sdpa"):
        flags = ops.Flags(attention=mode, fused_qkv=True)

        def fn(x: torch.Tensor, flags=flags) -> torch.Tensor:
            with torch.inference_mode(), ops.using(flags):
                return layer(x)

        g = GraphCache(fn, eager_fallback=False)
        outs[mode] = [g(x) for x in xs]  # the first call captures, the second replays new values
        assert g.captures == 1
    assert served and all(served)
    for i, x in enumerate(xs):
        with torch.inference_mode(), ops.using(ops.Flags(attention="math")):
            ref = layer32(x.float()).double()
        err = (outs["gluon"][i].double() - ref).abs().max().item()
        err16 = (outs["sdpa"][i].double() - ref).abs().max().item()
        assert not outs["gluon"][i].isnan().any()
        assert err <= 2 * err16, (i, err, err16)
