"""Every optimization flag set of the ablation runs the (tiny) engine and matches the reference.

On CPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1), so this
checks the kernels *as wired into the models*, not only one by one. CUDA graphs need a GPU and are
covered by tests/test_graphs.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import speedsd
from checkpoints import make_diffusers_folder
from interp_bounds import needs_interpreter
from speedsd import ops
from speedsd.bench.e2e import ablation

REFERENCE = ops.PRESETS["reference"]
# Under the interpreter each kernel launch costs seconds, so instead of every cumulative ablation row
# (each a superset of the one before) these cover every flag at least once, in both layouts:
KERNELS = ops.Flags(group_norm=True, gelu=True, winograd=True)
ROWS = [
    ("baseline (math softmax)", ops.Flags()),
    ("+kernels, partial softmax, NCHW", KERNELS.replace(attention="partial")),
    (
        "+kernels, flash, channels-last, fused QKV, fused epilogues",
        KERNELS.replace(
            attention="flash",
            channels_last=True,
            fused_qkv=True,
            fused_epilogues=True,
            subpixel_upsample=True,
            igemm_conv=True,
            gemm_algos=True,
        ),
    ),
    ("fused epilogues only, NCHW", ops.Flags(attention="sdpa", fused_epilogues=True)),
    ("sub-pixel upsample convs only, NCHW", ops.Flags(attention="sdpa", subpixel_upsample=True)),
    ("implicit-GEMM convs only, NCHW", ops.Flags(attention="sdpa", igemm_conv=True)),
]


def test_rows_cover_the_ablation():
    """Every flag an ablation row turns on (but CUDA graphs) is on in some row here."""
    fields = [f.name for f in dataclasses.fields(ops.Flags) if f.type == "bool" and f.name != "cuda_graphs"]
    assert "subpixel_upsample" in fields
    for _, flags in ablation():
        for field in fields:
            if getattr(flags, field):
                assert any(getattr(f, field) for _, f in ROWS), field
    assert {f.attention for _, f in ROWS} >= {"math", "partial", "flash"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_diffusers_folder(tmp_path_factory.mktemp("flags"), "sd1")
    return speedsd.load(str(folder), device="cpu", dtype=torch.float32, flags=REFERENCE)


@pytest.fixture(autouse=True)
def winograd_everywhere(monkeypatch):
    """Make the Winograd table pick F(4,3) for every eligible layer, so the +Winograd rows run it."""
    from speedsd.kernels import winograd

    class Every(dict):
        def get(self, key, default=None):
            return "4:triton"

    monkeypatch.setattr(winograd, "load_table", lambda: Every())


@pytest.fixture
def igemm_everywhere(monkeypatch):
    """Make the conv table pick the Triton implicit GEMM (split 3) for every conv it can run."""
    from speedsd import conv_table
    from speedsd.kernels.conv_igemm import IgemmConfig

    def choose(x_shape, n, kernel, stride, padding, dtype, device):
        return IgemmConfig(32, 32, 16, 3, 4, 2) if x_shape[1] % 16 == 0 else None

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    calls: list = []
    real = ops.conv2d_igemm
    monkeypatch.setattr(conv_table, "choose", choose)
    monkeypatch.setattr(ops, "conv2d_igemm", counted)
    return calls


@pytest.fixture(autouse=True)
def subpixel_everywhere(monkeypatch):
    """The tiny models' upsamplers see 2x2..8x8 inputs: let the sub-pixel form take all of them."""
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# These run the kernels on CPU tensors, i.e. under the Triton interpreter (CI). On a CUDA machine the
# same wiring runs on the GPU in tests/test_graphs.py and the bench's fidelity check.


@needs_interpreter
@pytest.mark.parametrize("name,flags", ROWS, ids=[n for n, _ in ROWS])
def test_flags_match_reference(pipe, name, flags, igemm_everywhere):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g) + 0.3
    z = torch.randn(1, 4, 8, 8, generator=g) * 3 + 0.5
    t = torch.tensor(421.0)
    ctx = pipe.encode_text(["a photo of a cat", ""])
    ref = pipe.with_flags(REFERENCE)
    want_eps, want_img = ref.unet_step(x, t, ctx), ref.decode_latents(z)
    fast = pipe.with_flags(flags)
    got_eps, got_img = fast.unet_step(x, t, ctx), fast.decode_latents(z)
    assert _rel(got_eps, want_eps) < 1e-4, name
    assert _rel(got_img, want_img) < 1e-4, name
    assert bool(igemm_everywhere) == flags.igemm_conv, "the Triton conv ran iff its flag is on"
    got_ctx = fast.encode_text(["a photo of a cat", ""])
    assert _rel(got_ctx, ctx) < 1e-4, name


@needs_interpreter
def test_group_norm_statistics_handed_over_in_the_models(pipe, monkeypatch):
    """With split GroupNorm plans forced (the SD shapes' plans; the tiny model would fit one tile), the
    blocks' closing adds hand their GroupNorm statistics to the next block, and the output is unchanged."""
    import importlib

    gn = importlib.import_module("speedsd.kernels.group_norm")
    ags = importlib.import_module("speedsd.kernels.add_gn_stats")

    def plan_for(n, c, s, groups, cl, itemsize, device):
        return gn.plan_group_norm(n, c, s, groups, cl, itemsize, 4, path="split", tile=32, programs=3)

    monkeypatch.setattr(gn, "plan_for", plan_for)
    monkeypatch.setattr(ags, "plan_for", plan_for)
    used = []
    real_take = ags.GNStats.take
    monkeypatch.setattr(ags.GNStats, "take", lambda self, *a: used.append(real_take(self, *a)) or used[-1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g) + 0.3
    z = torch.randn(1, 4, 8, 8, generator=g) * 3 + 0.5
    ctx = pipe.encode_text(["a photo of a cat", ""])
    ref = pipe.with_flags(REFERENCE)
    fast = pipe.with_flags(ROWS[2][1])
    assert _rel(fast.unet_step(x, torch.tensor(421.0), ctx), ref.unet_step(x, torch.tensor(421.0), ctx)) < 1e-4
    n_unet = sum(p is not None for p in used)
    assert _rel(fast.decode_latents(z), ref.decode_latents(z)) < 1e-4
    assert n_unet > 0 and sum(p is not None for p in used) > n_unet  # both models used handed-over statistics


@needs_interpreter
def test_time_adds_computed_ahead_match_the_step(pipe):
    """A loop's time pre-adds, computed for all steps at once, give the step's own output."""
    fast = pipe.with_flags(ROWS[2][1])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) + 0.3
    ctx = pipe.encode_text(["a photo of a cat", ""])
    ts = torch.tensor([801.0, 421.0, 21.0])
    adds = fast.time_adds(ts)
    assert adds is not None and adds.shape[0] == 3
    for i in (0, 2):
        want = fast.unet_step(x, ts[i], ctx)
        assert _rel(fast.unet_step(x, ts[i], ctx, time_adds=adds[i]), want) < 1e-6
    assert _rel(fast.unet_step(x, ts[0], ctx, time_adds=adds[1]), fast.unet_step(x, ts[1], ctx)) < 1e-6
    assert pipe.with_flags(REFERENCE).time_adds(ts) is None  # the blocks project it themselves then


@needs_interpreter
def test_whole_image_with_every_kernel(pipe):
    """A 1-step image with all CPU-runnable optimizations equals the reference image."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(steps=1, height=16, width=16, latents=latents, output="tensor", scheduler="ddim")
    want = pipe.with_flags(REFERENCE)("a red fox", **kw)
    got = pipe.with_flags(ROWS[2][1])("a red fox", **kw)
    assert _rel(got, want) < 1e-4


def test_kernel_flag_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 32, 4, 4)
    with ops.using(ops.Flags(group_norm=True)), pytest.raises(RuntimeError, match="kernel was asked for"):
        ops.group_norm_op(x, 8, None, None, 1e-5)


def test_flags_reject_unknown_attention():
    with pytest.raises(ValueError, match="attention must be one of"):
        ops.Flags(attention="fastest")


def test_ops_reexports_the_flags_module():
    """The models and tests reach the flags through ops; they are the objects of speedsd.flags."""
    from speedsd import flags

    for name in ("ATTENTION_MODES", "PRESETS", "Flags", "current", "default_flags", "set_flags", "using"):
        assert getattr(ops, name) is getattr(flags, name), name


def test_using_scopes_the_flags_and_restores_them_on_error():
    before = ops.current()
    inner = ops.Flags(group_norm=True, attention="flash")
    with pytest.raises(RuntimeError, match="boom"), ops.using(inner) as got:
        assert got is inner and ops.current() is inner
        raise RuntimeError("boom")
    assert ops.current() is before


@pytest.mark.parametrize(
    "device, preset", [("cpu", "reference"), ("cuda", "fast"), ("cuda:1", "fast"), ("meta", "reference")]
)
def test_default_flags_per_device(device, preset):
    assert ops.default_flags(device) == ops.PRESETS[preset]
    assert ops.PRESETS["baseline"] == ops.Flags()  # the paper's starting point: every flag off
