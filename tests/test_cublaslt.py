"""cuBLASLt with a measured algorithm (speedsd/cublaslt.py, gemm_table.py, ops.linear_op / linear_accumulate_op).

CPU: the layout rules that decide which linears cuBLASLt may take (row strides, weight slices, alignment, bias,
output), the table's keys and checks, and the ops routing with a stand-in plan (the problem collected, the plan's
run called with the right operands; torch where the flag is off or the table has no entry). GPU: every algorithm
the heuristic offers against fp64 (<= 2x torch's error) on the UNet's shapes and odd ones (bias, in-place
accumulate, a strided weight slice, 128-byte alignment), the table's config found again, and linear_op replayed
from a CUDA graph.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from speedsd import cublaslt, gemm_table, ops
from speedsd.cublaslt import Problem, layout_problem


def h(*shape, seed=0):
    """fp16 randn + 0.3 at a 256-byte aligned address (as the CUDA allocator gives; CPU's gives 64)."""
    n = torch.Size(shape).numel()
    buf = torch.empty(n + 128, dtype=torch.float16)
    off = (-buf.data_ptr() % 256) // 2
    t = buf[off : off + n].view(shape)
    return t.copy_(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 0.3)


def test_layout_problem_accepts_the_engines_linears():
    x, w = h(2, 64, 320), h(960, 320)
    assert layout_problem(x, w, None) == Problem(128, 320, 960, 320, 320, torch.float16)
    nhwc = h(2, 8, 8, 320).permute(0, 3, 1, 2)  # a channels_last [N, C, H, W] activation
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    nhwc = nhwc.permute(0, 2, 3, 1)  # proj_in's [N, H, W, C] view
    assert layout_problem(nhwc, w, h(960)) == Problem(128, 320, 960, 320, 320, torch.float16, bias=True)
    wide = h(320, 960)  # the skip concatenation's split weight: columns 640.. of [Co, C1 + C2]
    p = layout_problem(h(128, 320), wide[:, 640:], None, out=h(128, 320))
    assert p == Problem(128, 320, 320, 320, 960, torch.float16, accumulate=True, align=256)
    assert layout_problem(h(128, 320), wide[:, 320:640], None).align == 128  # 640-byte offset


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: (h(64, 320).float(), h(96, 320).float(), None, None), "fp32"),
        (lambda: (h(64, 320), h(96, 256), None, None), "K mismatch"),
        (lambda: (h(320, 64).t(), h(96, 320), None, None), "x columns strided"),
        (lambda: (h(4, 64, 320).transpose(0, 1), h(96, 320), None, None), "x not one row stride"),
        (lambda: (h(64, 320), h(320, 96).t(), None, None), "weight transposed"),
        (lambda: (h(64, 320), h(96, 320), h(96).float(), None), "bias dtype"),
        (lambda: (h(64, 320), h(96, 320), h(95), None), "bias length"),
        (lambda: (h(64, 320), h(96, 320), None, h(96, 64).t()), "out not contiguous"),
        (lambda: (h(64, 321)[:, 1:], h(96, 320), None, None), "x 2-byte aligned"),
        (lambda: (h(64, 324)[:, :320], h(96, 320), None, None), "x row stride not a multiple of 8"),
    ],
)
def test_layout_problem_refuses(make, why):
    assert layout_problem(*make()) is None, why


def test_problem_of_is_cuda_only():
    assert cublaslt.problem_of(h(64, 320), h(96, 320), None) is None


def test_table_keys_and_checks(tmp_path, monkeypatch):
    p = Problem(8192, 320, 320, 320, 320, torch.float16)
    assert gemm_table.problem_key(p) == "8192x320->320 ldx320 ldw320 plain a256 float16"
    q = Problem(512, 640, 1280, 640, 1920, torch.float16, accumulate=True, align=128)
    assert gemm_table.problem_key(q) == "512x640->1280 ldx640 ldw1920 acc a128 float16"
    path = tmp_path / "gemm_table.json"
    monkeypatch.setattr(gemm_table, "TABLE_PATH", path)
    monkeypatch.setattr(gemm_table, "card_name", lambda device: "Card")
    gemm_table.merge_into(path, "Card", {gemm_table.problem_key(p): {"config": {"tile": 135, "cluster": 3}}})
    assert gemm_table.choose(p, torch.device("cpu")) == {"tile": 135, "cluster": 3}
    assert gemm_table.choose(q, torch.device("cpu")) is None
    path.write_text(json.dumps({"cards": {"Card": {"k": {"config": {"tile": "x"}}}}}))
    gemm_table._table.cache_clear()
    with pytest.raises(ValueError, match="config must map"):
        gemm_table.choose(p, torch.device("cpu"))
    gemm_table._table.cache_clear()


class FakePlan:
    """Stands in for a cuBLASLt plan: torch math, calls recorded."""

    def __init__(self, calls):
        self.calls = calls

    def run(self, x, w, bias, out):
        self.calls.append((tuple(x.shape), tuple(w.shape), bias is not None, out.data_ptr()))
        y = F.linear(x.float(), w.float(), None if bias is None else bias.float()).reshape(out.shape)
        return out.add_(y.to(out.dtype)) if self.accumulate else out.copy_(y)


@pytest.fixture
def fake_lt(monkeypatch):
    """cuBLASLt as a torch stand-in on CPU: problem_of without the device check, every problem in the table."""
    calls, seen = [], []

    def plan(problem, device, config):
        p = FakePlan(calls)
        p.accumulate = problem.accumulate
        seen.append((problem, config))
        return p

    monkeypatch.setattr(cublaslt, "problem_of", layout_problem)
    monkeypatch.setattr(cublaslt, "plan", plan)
    monkeypatch.setattr(gemm_table, "choose", lambda problem, device: {"tile": 1})
    monkeypatch.setattr(gemm_table, "has_entries", lambda device: True)
    monkeypatch.setattr(ops, "_on_cuda", lambda t: True)
    return calls, seen


def test_linear_op_routing(fake_lt):
    calls, seen = fake_lt
    x, w, b = h(2, 64, 320), h(96, 320), h(96)
    with ops.using(ops.Flags(gemm_algos=True)):
        y = ops.linear_op(x, w, b)
        r = h(2, 64, 96)
        r0 = r.clone()
        s = ops.linear_accumulate_op(r, x, w)
    assert s is r and y.shape == (2, 64, 96)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(r.float(), r0.float() + F.linear(x.float(), w.float()), atol=2e-2, rtol=1e-3)
    assert [c[2] for c in calls] == [True, False] and calls[1][3] == r.data_ptr()
    assert seen[0][0].bias and seen[1][0].accumulate
    with ops.using(ops.Flags()):  # the flag off: torch
        ops.linear_op(x, w, b)
    with ops.using(ops.Flags(gemm_algos=True)):  # a layout cuBLASLt may not take: torch
        ops.linear_op(x.transpose(0, 1), w, b)
    assert len(calls) == 2


def test_linear_ops_collect_problems(fake_lt, monkeypatch):
    monkeypatch.setattr(gemm_table, "choose", lambda problem, device: None)  # no entry: torch, still collected
    monkeypatch.setattr(ops, "_seen_linears", set())
    with ops.using(ops.Flags(gemm_algos=True)):
        ops.linear_op(h(128, 64), h(32, 64))
        ops.linear_accumulate_op(h(128, 32), h(128, 64), h(32, 64))
    assert ops._seen_linears == {Problem(128, 64, 32, 64, 64, torch.float16),
                                 Problem(128, 64, 32, 64, 64, torch.float16, accumulate=True)}  # fmt: skip
    assert fake_lt[0] == []


def test_cpu_is_torch():
    x, w = h(2, 16, 64).float(), h(32, 64).float()
    r = h(2, 16, 32).float()
    r0 = r.clone()
    with ops.using(ops.Flags(gemm_algos=True)):
        torch.testing.assert_close(ops.linear_op(x, w), F.linear(x, w))
        assert ops.linear_accumulate_op(r, x, w) is r
    torch.testing.assert_close(r, r0 + F.linear(x, w))


# ---- GPU ----------------------------------------------------------------------------------------------------

GPU_CASES = [  # (M, K, N), ldw, bias, accumulate, x offset (elements)
    pytest.param((8192, 320, 320), 320, False, False, 0, id="unet64-320"),
    pytest.param((2048, 640, 1920), 640, False, False, 0, id="unet32-qkv"),
    pytest.param((512, 5120, 1280), 5120, False, True, 0, id="unet16-ff-closing-accumulate"),
    pytest.param((128, 1280, 1280), 2560, False, True, 0, id="skip-split-weight-ldw"),
    pytest.param((333, 192, 320), 192, True, False, 64, id="odd-M-bias-128-byte-aligned"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, ldw, with_bias, accumulate, offset", GPU_CASES)
def test_gpu_every_heuristic_algorithm(shape, ldw, with_bias, accumulate, offset):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m, k, n = shape
    x = h(m * k + offset, seed=1).cuda()[offset:].view(m, k)
    w = (h(n, ldw, seed=2).cuda() / k**0.5)[:, :k]  # (a slice of the scaled weight: row stride ldw)
    bias = h(n, seed=3).cuda() if with_bias else None
    r0 = h(m, n, seed=4).cuda() if accumulate else None
    p = cublaslt.problem_of(x, w, bias, r0)
    assert p is not None and p.ldw == ldw and p.align == (128 if offset else 256)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    ref = ref if r0 is None else ref + r0.double()
    torch_out = F.linear(x, w, bias) if r0 is None else r0.clone().addmm_(x, w.t())
    tol = 2 * (torch_out.double() - ref).abs().max().item() + 1e-3
    plan = cublaslt.Plan(p, 0)
    found = plan.heuristics()
    assert found, "the heuristic offers at least one algorithm"
    for algo, config, _ in found:
        plan.algo = algo
        out = torch.full((m, n), float("nan"), device="cuda").half() if r0 is None else r0.clone()
        plan.run(x, w, bias, out)
        torch.cuda.synchronize()
        assert (out.double() - ref).abs().max().item() <= tol, config
    assert cublaslt.plan(p, 0, found[-1][1]) is not None  # a config is found again
    assert cublaslt.plan(p, 0, {"tile": 10**6}) is None


@pytest.mark.gpu
def test_gpu_linear_op_in_cuda_graph(tmp_path, monkeypatch):
    """linear_op with a table entry runs cuBLASLt, captured and replayed from a CUDA graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w = h(2, 4096, 320).cuda(), h(320, 320, seed=1).cuda() / 18
    p = cublaslt.problem_of(x, w, None)
    config = cublaslt.Plan(p, 0).heuristics()[-1][1]
    path = tmp_path / "gemm_table.json"
    gemm_table.merge_into(path, torch.cuda.get_device_name(), {gemm_table.problem_key(p): {"config": config}})
    monkeypatch.setattr(gemm_table, "TABLE_PATH", path)
    gemm_table._table.cache_clear()
    try:
        with ops.using(ops.Flags(gemm_algos=True)):
            assert ops._lt_plan(x, w, None, None) is not None
            ops.linear_op(x, w)  # warm
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = ops.linear_op(x, w)
        x.copy_(h(2, 4096, 320, seed=5).cuda())
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=2e-2, rtol=2e-3)
    finally:
        gemm_table._table.cache_clear()
