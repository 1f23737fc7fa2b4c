"""The Gluon conv's 1x1 mode as a linear layer (kernels/linear_gluon.py, TAPS = 1): y = x @ Wᵀ (+ bias) (+ r).

CPU: the launcher's checks, and a torch model of the kernel's unit walk run on the launcher's own descriptors (every
unit (token tile, channel block) once, its K steps' boxes, the residual's identity K steps, the clipped store)
against F.linear in fp32, on real and odd shapes (partial token tiles, bn + bn1 tiles, residual); sm_90 AOT
compiles (no spills); ops.linear_op / linear_accumulate_op routing by the conv table. GPU (sm_90): the kernel
against fp64 (<= 2x cuBLAS fp16's error), on the UNet's shapes and odd ones.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gluon_aot import ptxas_log, require_gluon_aot, run_compile_child, spills
from speedsd import conv_table, ops
from speedsd.kernels import conv_gluon as cg
from speedsd.kernels.linear_gluon import linear_gluon, linear_gluon_ref, linear_gluon_supported


def make(m, k, n, device="cpu", seed=0, residual=False):
    """x ~ 2·N + 0.5 [m, k], W ~ N(0, 1/k) + 0.01 [n, k], bias ~ N(0.3, 1), r ~ N(0.2, 1); fp16."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2 + 0.5).half().to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5 + 0.01).half().to(device)
    bias = (torch.randn(n, generator=g) + 0.3).half().to(device)
    r = (torch.randn(m, n, generator=g) + 0.2).half().to(device) if residual else None
    return x, w, bias, r


def _emulate(x, weight, bias, y, cfg, sms, residual=None):
    """The kernel's work on the launcher's descriptors: unit t = tx·n_nb + nb (one image row of tokens); K step
    ks reads x's [1, 1, TW, BK] box at (0, 0, ox0, c0) (zeros past M, as TMA fills) and W's rows n0 .., columns
    c0 ..; the residual's RS steps read its box at channel n0 + j·BK times the identity's columns j·BK ..; the
    fp32 sum (+ bias) is stored to y[0, 0, ox0 :, n0 :] clipped at M."""
    grid, args, const = cg._launch_args(x, weight, bias, y, cfg, sms, residual, taps=1)
    xd, wd, yd, rd, idd, i1d, w1d, y1d, bias_ptr, _, _, c, h, w, co, n_img, n_th, n_tw, n_split, n_nb, units = args
    assert const["TAPS"] == 1 and const["HAS_RES"] == (residual is not None) and not const["STATS"]
    assert xd.block_shape == [1, 1, cfg.tw, cfg.bk] and wd.block_shape == [cfg.bn, cfg.bk]
    assert yd.block_shape == [1, 1, cfg.tw, cfg.bn // cfg.epi_split] and (n_img, h, n_th, n_split) == (1, 1, 1, 1)
    x_nhwc, w_mat, y_nhwc = xd.base, wd.base, yd.base
    assert tuple(w_mat.shape) == (co, c) and w_mat.data_ptr() == weight.data_ptr()
    assert tuple(y_nhwc.shape) == (1, 1, w, co) and y_nhwc.data_ptr() == y.data_ptr()
    width = cfg.width
    xp = F.pad(x_nhwc[0, 0].float(), (0, 0, 0, cfg.tw))  # zero rows past M
    rp = None if residual is None else F.pad(rd.base[0, 0].float(), (0, 2 * cfg.bk, 0, cfg.tw))
    eye = None if residual is None else idd.base.float()
    seen = []
    for p in range(grid[0]):
        for t in range(p, units, grid[0]) if cfg.persistent else [p]:
            seen.append(t)
            nb, tx = t % n_nb, t // n_nb
            ox0, n0 = tx * cfg.tw, nb * width
            acc = torch.zeros(cfg.tw, width)
            for cb in range(c // cfg.bk):
                c0 = cb * cfg.bk
                acc += xp[ox0 : ox0 + cfg.tw, c0 : c0 + cfg.bk] @ w_mat[n0 : n0 + width, c0 : c0 + cfg.bk].float().T
            if rp is not None:
                for j in range(-(-width // cfg.bk)):  # box channels past the tile meet the identity's zeros
                    box = rp[ox0 : ox0 + cfg.tw, n0 + j * cfg.bk : n0 + (j + 1) * cfg.bk]
                    acc += box @ eye[:width, j * cfg.bk : (j + 1) * cfg.bk].T
            if bias is not None:
                acc += bias_ptr[n0 : n0 + width].float()
            y_nhwc[0, 0, ox0 : ox0 + cfg.tw, n0 : n0 + width] = acc.to(y.dtype)[: w - ox0]  # clipped at M
    assert sorted(seen) == list(range(units)), "every unit exactly once"
    assert units == n_tw * n_nb == -(-w // cfg.tw) * (co // width)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an sm_90 device with 3 SMs: the launch runs the torch model of the kernel's unit walk."""
    calls = []

    def launch(x, weight, bias, y, cfg, residual=None, part=None, taps=9):
        assert taps == 1 and part is None
        calls.append((cfg, residual is not None))
        _emulate(x, weight, bias, y, cfg, sms=3, residual=residual)

    monkeypatch.setattr(cg, "_device_ok", lambda device: True)
    monkeypatch.setattr(cg, "_launch", launch)
    return calls


CASES = [  # (M, K, N), config, bias, residual
    pytest.param((512, 128, 320), "g1x128n128+32k64s4c2e1p", False, False, id="unet-like-bn128+32"),
    pytest.param((200, 64, 320), "g1x64n256+64k64s4c1e2p", True, False, id="partial-token-tile-bn256+64"),
    pytest.param((130, 192, 128), "g1x128n128k64s4c2e1p", True, True, id="residual-bias-partial-tile"),
    pytest.param((256, 256, 320), "g1x128n128+32k64s5c2e1p", False, True, id="ff-closing-residual-bn128+32"),
    pytest.param((64, 64, 64), "g1x64n64k64s8c1e1", False, False, id="one-tile-nonpersistent"),
]


@pytest.mark.parametrize("shape, key, with_bias, with_res", CASES)
def test_launcher_against_the_unit_model(fake_gpu, shape, key, with_bias, with_res):
    m, k, n = shape
    x, w, bias, r = make(m, k, n, residual=with_res)
    b = bias if with_bias else None
    lead = (2, m // 2) if m % 2 == 0 else (m,)  # a [B, N, C] token tensor, or rows
    y = linear_gluon(x.view(*lead, k), w, b, key, None if r is None else r.view(*lead, n))
    assert y.shape[-1] == n and y.numel() == m * n and not y.isnan().any()
    want = linear_gluon_ref(x.float(), w.float(), None if b is None else b.float(), None if r is None else r.float())
    torch.testing.assert_close(y.reshape(m, n).float(), want, atol=2e-2, rtol=2e-3)
    assert fake_gpu == [(cg.GluonConvConfig.parse(key), with_res)]


BAD = [
    pytest.param(lambda x, w, b, r: (x, w[:, :64], b, r), "expects x", id="K-mismatch"),
    pytest.param(lambda x, w, b, r: (x.float(), w.float(), b, r), "fp16", id="fp32"),
    pytest.param(lambda x, w, b, r: (x.t().contiguous().t(), w, b, r), "contiguous", id="strided-x"),
    pytest.param(lambda x, w, b, r: (x, w, torch.ones(64).half(), r), "bias must be", id="bias-length"),
    pytest.param(lambda x, w, b, r: (x[:, :32].contiguous(), w[:, :32].contiguous(), b, r), "multiple of 64",
                 id="K32"),  # fmt: skip
    pytest.param(lambda x, w, b, r: (x, w, b, torch.ones(3, 128).half()), "residual must be", id="residual-shape"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_clear_errors(fake_gpu, args, match):
    x, w, bias, r = make(128, 128, 128, residual=True)
    x, w, bias, r = args(x, w, bias, r)
    with pytest.raises(ValueError, match=match):
        linear_gluon(x, w, bias, "g1x128n128k64s4c2e1p", r)
    assert not linear_gluon_supported(x, w, bias, "g1x128n128k64s4c2e1p", r)
    assert not fake_gpu


def test_refusals(fake_gpu):
    x, w, bias, _ = make(128, 128, 128)
    with pytest.raises(ValueError, match="1 x TW pixel tiles"):
        linear_gluon(x, w, bias, "g8x16n128k64s4c2e1p")
    with pytest.raises(ValueError, match="1 x TW pixel tiles"):
        linear_gluon(x, w, bias, "g1x128n128k64s4c2e1sk2p")
    assert not linear_gluon_supported(x, w, bias, "g1x128n256k64s4c2e2p")  # N = 128 < its width
    assert not linear_gluon_supported(x, w, bias, "not-a-key")
    assert linear_gluon_supported(x, w, bias, "g1x128n128k64s4c2e1p")


# ---- routing: ops.linear_op / linear_accumulate_op take the conv table's linear entry ----------------------


@pytest.fixture
def linear_table(tmp_path, monkeypatch):
    key = conv_table.linear_key(256, 128, 320, torch.float16)
    path = tmp_path / "conv_table.json"
    card = conv_table.card_name(torch.device("cpu"))
    path.write_text(json.dumps({"cards": {card: {key: {"best": "gluon", "config": "g1x128n128+32k64s4c2e1p"}}}}))
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    conv_table._table.cache_clear()
    yield "g1x128n128+32k64s4c2e1p"
    conv_table._table.cache_clear()


def test_linear_config_reads_the_entry(linear_table):
    cpu = torch.device("cpu")
    assert conv_table.linear_config(256, 128, 320, torch.float16, cpu) == cg.GluonConvConfig.parse(linear_table)
    assert conv_table.linear_config(256, 128, 640, torch.float16, cpu) is None
    assert conv_table.linear_key(8192, 320, 960, torch.float16) == "8192x320->960 linear float16"


def test_linear_op_off_cuda_is_torch(fake_gpu, linear_table):
    """Off CUDA (here: CPU tensors) linear_op is F.linear even with an entry and the flag on."""
    x, w, bias, _ = make(256, 128, 320)
    with ops.using(ops.Flags(igemm_conv=True)):
        y = ops.linear_op(x, w, bias)
    assert fake_gpu == [] and torch.equal(y, F.linear(x, w, bias))


def test_linear_op_gluon_path(fake_gpu, linear_table, monkeypatch):
    x, w, bias, r = make(256, 128, 320, residual=True)
    monkeypatch.setattr(ops, "_on_cuda", lambda t: True)
    with ops.using(ops.Flags(igemm_conv=True)):
        y = ops.linear_op(x.view(2, 128, 128), w, bias)
        assert fake_gpu == [(cg.GluonConvConfig.parse(linear_table), False)] and y.shape == (2, 128, 320)
        torch.testing.assert_close(y.view(256, 320).float(), linear_gluon_ref(x.float(), w.float(), bias.float()),
                                   atol=2e-2, rtol=2e-3)  # fmt: skip
        r0 = r.clone()
        s = ops.linear_accumulate_op(r, x, w)
        assert fake_gpu[-1][1] and s is not r and torch.equal(r, r0)  # the epilogue: a new tensor, r untouched
        torch.testing.assert_close(s.float(), linear_gluon_ref(x.float(), w.float(), None, r0.float()), atol=2e-2,
                                   rtol=2e-3)  # fmt: skip
        ops.linear_op(x[:128], w, bias)  # no entry for M = 128
        ops.linear_accumulate_op(r[:128], x[:128], w)  # (cuBLAS in place)
    with ops.using(ops.Flags()):
        ops.linear_op(x, w, bias)
    assert len(fake_gpu) == 2


def test_linear_accumulate_torch_path_in_place():
    x, w, _, r = make(96, 64, 48, residual=True)
    x, w, r = x.float(), w.float(), r.float()
    r0 = r.clone()
    with ops.using(ops.Flags(igemm_conv=True)):
        s = ops.linear_accumulate_op(r.view(2, 48, 48), x.view(2, 48, 64), w)
    assert s.data_ptr() == r.data_ptr()
    torch.testing.assert_close(r, r0 + x @ w.T)


# ---- sm_90 ahead-of-time compile -------------------------------------------------------------------------

AOT = ["g1x128n128+32k64s4c2e1p", "g1x64n256+64k64s4c1e2p", "g1x128n128k64s6c2e1p", "g1x128n128+32k64s4c2e1p:r"]
_AOT_CHILD = """
import sys, torch
from pathlib import Path
from speedsd.kernels import conv_gluon as cg
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    key, _, res = name.partition(":")
    k = cg.compile_sm90(cg.GluonConvConfig.parse(key), None if res else torch.float16, residual=bool(res), taps=1)
    (out / f"{name}.ptx").write_text(k.asm["ptx"])
"""


@pytest.fixture(scope="module")
def sm90_ptx(tmp_path_factory):
    require_gluon_aot(cg._kernels() is not None)
    out = tmp_path_factory.mktemp("aot_linear")
    run_compile_child(_AOT_CHILD, cg.__file__, str(out), *AOT)
    return {key: ((out / f"{key}.ptx").read_text(), ptxas_log(out / f"{key}.ptx")) for key in AOT}


@pytest.mark.parametrize("key", AOT)
def test_aot_compile_sm90(key, sm90_ptx):
    ptx, log = sm90_ptx[key]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.4d.shared::cluster.global" in ptx
    assert "cp.async.bulk.tensor.4d.global.shared::cta" in ptx  # the tile's TMA store
    assert spills(log) == (0, 0), log
    assert "serialized" not in log, log


# ---- GPU (sm_90) -------------------------------------------------------------------------------------

GPU_CASES = [  # (M, K, N), config, bias, residual: the UNet's transformer linears and odd shapes
    pytest.param((8192, 320, 320), "g1x128n128+32k64s4c2e1p", False, False, id="unet64-320"),
    pytest.param((8192, 320, 960), "g1x128n128+32k64s4c2e1p", False, False, id="unet64-qkv"),
    pytest.param((8192, 1280, 320), "g1x128n128+32k64s4c2e1p", False, True, id="unet64-ff-closing"),
    pytest.param((2048, 640, 640), "g1x64n256+64k64s4c1e2p", False, False, id="unet32-640"),
    pytest.param((512, 5120, 1280), "g1x64n128k64s6c1e1p", False, True, id="unet16-ff-closing"),
    pytest.param((333, 192, 320), "g1x128n128+32k64s4c2e1p", True, True, id="odd-M-bias-residual"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, key, with_bias, with_res", GPU_CASES)
def test_gpu_linear(shape, key, with_bias, with_res):
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and cg._kernels()):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")
    m, k, n = shape
    x, w, bias, r = make(m, k, n, device="cuda", residual=with_res)
    b = bias if with_bias else None
    torch.empty(m * n * 4, device="cuda").fill_(float("nan"))  # poison the allocator's free memory
    y = linear_gluon(x, w, b, key, r)
    torch.cuda.synchronize()
    assert not y.isnan().any(), "unwritten outputs"
    ref = linear_gluon_ref(x.double(), w.double(), None if b is None else b.double(), None if r is None else r.double())
    cublas = F.linear(x, w, b) if r is None else r.clone().addmm_(x, w.t()) + (0 if b is None else b)
    err, err16 = (y.double() - ref).abs().max().item(), (cublas.double() - ref).abs().max().item()
    assert err <= 2 * err16, (err, err16)
