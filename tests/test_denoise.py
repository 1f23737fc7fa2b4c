"""speedsd.denoise: the eager loop projects the text's cross-attention K/V once per image, and that
changes nothing in the result; with fused_epilogues the CFG plumbing runs as two kernels, with the
same numbers and fewer launches. (The whole-loop CUDA graph is tested against the step-by-step path
in tests/test_graphs.py on a GPU.)"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from unittest.mock import patch

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import speedsd
from interp_bounds import needs_interpreter
from speedsd import denoise, ops
from speedsd.models.layers import CrossKV
from speedsd.models.unet import UNet2DCondition
from speedsd.schedulers import SD_V1, DDIMScheduler, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_eager_loop_projects_text_once(scheduler: str) -> None:
    flags = ops.PRESETS["reference"].replace(fused_qkv=True)
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float32, flags=flags)
    kw = dict(steps=3, height=32, width=32, seed=7, output="latent", scheduler=scheduler, guidance_scale=5.0)
    calls: list[int] = []
    real = CrossKV.build

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with patch.object(CrossKV, "build", staticmethod(counting)):
        scoped = pipe("a cat", **kw)
        assert len(calls) == 1  # one projection for the whole loop (PNDM: 4 UNet evaluations)
        other = pipe("a dog", **kw)  # a new prompt is projected anew
        assert len(calls) == 2
        with patch.object(UNet2DCondition, "context_scope", lambda self: contextlib.nullcontext()):
            unscoped = pipe("a cat", **kw)
        assert len(calls) == 2 + (4 if scheduler == "pndm" else 3)  # once per UNet evaluation
    torch.testing.assert_close(scoped, unscoped, atol=0, rtol=0)
    assert not torch.equal(scoped, other)


# ---- the CFG plumbing as two kernels (fused_epilogues; kernels/guidance.py) -------------------------

FUSED = ops.PRESETS["reference"].replace(fused_epilogues=True, channels_last=True)
PLUMBING_SCHEDULERS = ["pndm", "ddim", "euler", "dpmpp_2m", "euler_a"]


def _fake_unet(x: torch.Tensor, ts: torch.Tensor, emb: torch.Tensor, *adds: torch.Tensor) -> torch.Tensor:
    """A cheap stand-in for the UNet: depends on each row's latents, timestep and text (so the uncond
    and cond halves differ), in the model's dtype and x's layout."""
    v = emb.float().mean((1, 2)).view(-1, 1, 1, 1) + ts.float().view(-1, 1, 1, 1) * 1e-3  # [B, 1, 1, 1]
    return (x.float() * 0.9 + v).to(x.dtype)


def _run(pipe, monkeypatch, fused: bool, **kw) -> tuple[torch.Tensor, list[str]]:
    """pipe("a cat", **kw) through the kernel plumbing (fused) or the torch path; which kernels ran."""
    used: list[str] = []
    for name in ("cfg_input", "cfg_combine"):
        real = getattr(denoise, name)
        monkeypatch.setattr(denoise, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    if not fused:
        monkeypatch.setattr(denoise, "fused_plumbing", lambda *a: False)
    try:
        return pipe("a cat", **kw), used
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def fused_fp32():
    return speedsd.load("random:tiny", device="cpu", dtype=torch.float32, flags=FUSED)


@needs_interpreter  # CPU tensors through the kernels; on a GPU, test_graphs and the bench cover them
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("scheduler", PLUMBING_SCHEDULERS)
def test_fused_plumbing_matches_torch_path(fused_fp32, monkeypatch, scheduler: str, guidance: float) -> None:
    """The tiny UNet (its own fused kernels on) denoised with the plumbing kernels == the torch path."""
    kw = dict(steps=2, height=32, width=32, seed=11, output="latent", scheduler=scheduler, guidance_scale=guidance)
    got, used = _run(fused_fp32, monkeypatch, True, **kw)
    want, used_torch = _run(fused_fp32, monkeypatch, False, **kw)
    evals = 3 if scheduler == "pndm" else 2
    # the input kernel duplicates (guidance) and makes channels_last; the combine runs with guidance only
    assert used == (["cfg_input", "cfg_combine"] * evals if guidance > 1 else ["cfg_input"] * evals)
    assert used_torch == []
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # (bit-equal on the CPU)
    assert torch.isfinite(got).all() and got.abs().mean() > 0.1


@needs_interpreter  # CPU tensors through the kernels; on a GPU, test_graphs and the bench cover them
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("scheduler", PLUMBING_SCHEDULERS)
def test_fused_plumbing_fp16_model_bit_equal(monkeypatch, scheduler: str, guidance: float, channels_last: bool):
    """An fp16 model (as on the GPU): fp32 latents cast to fp16 (and channels_last), the fp16 output
    upcast and combined, the same bits as the torch path. A stand-in UNet keeps this fast."""
    flags = FUSED.replace(channels_last=channels_last)
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float16, flags=flags)
    seen: list[tuple[torch.Size, torch.dtype, bool]] = []

    def unet(x, ts, emb, *adds):
        seen.append((x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return _fake_unet(x, ts, emb)

    pipe._unet_forward = unet
    kw = dict(steps=3, height=32, width=32, seed=5, output="latent", scheduler=scheduler, guidance_scale=guidance)
    got, used = _run(pipe, monkeypatch, True, **kw)
    inputs_fused, seen[:] = list(seen), []
    want, _ = _run(pipe, monkeypatch, False, **kw)
    assert "cfg_input" in used and ("cfg_combine" in used) == (guidance > 1)
    assert inputs_fused == seen  # the UNet got the same shapes, dtype and layout
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


class _LaunchCount(TorchDispatchMode):
    """The aten ops that launch a kernel on a GPU while ``on``: ops writing a fresh tensor of >= 1 dim
    (views and no-op .to/.contiguous return their input's storage; 0-dim results are the samplers'
    host-side scalars), plus host syncs (.item()). Triton launches are recorded by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            leaves = torch.utils._pytree.tree_leaves
            ins = {a.untyped_storage().data_ptr() for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            outs = [o for o in leaves(out) if isinstance(o, torch.Tensor)]
            fresh = any(o.dim() > 0 and o.untyped_storage().data_ptr() not in ins for o in outs)
            if fresh or func.overloadpacket.__name__ == "_local_scalar_dense":
                self.ops.append(str(func.overloadpacket).removeprefix("aten."))
        return out


def _count_one_step(pipe, monkeypatch, fused: bool, scheduler: str, guidance: float) -> list[str]:
    """The launches of one steady-state step outside the UNet: from the end of the 2nd UNet call to
    the start of the 3rd (guidance combine, sampler update, next UNet input)."""
    mode, calls = _LaunchCount(), []

    def unet(x, ts, emb, *adds):
        with _disable_current_modes():
            out = _fake_unet(x, ts, emb)
        calls.append(1)
        mode.on = len(calls) == 2
        return out

    monkeypatch.setattr(pipe, "_unet_forward", unet)

    def launching(name: str):
        real = getattr(denoise, name)

        def launch(*a, **k):
            if mode.on:
                mode.ops.append(f"triton:{name}")
            with _disable_current_modes():  # (the interpreter's own tensor copies are no GPU launches)
                return real(*a, **k)

        return launch

    for name in ("cfg_input", "cfg_combine"):
        monkeypatch.setattr(denoise, name, launching(name))
    if not fused:
        monkeypatch.setattr(denoise, "fused_plumbing", lambda *a: False)
    try:
        with mode:
            pipe("a cat", steps=4, height=32, width=32, seed=1, output="latent", scheduler=scheduler,
                 guidance_scale=guidance)  # fmt: skip
    finally:
        monkeypatch.undo()
    assert len(calls) >= 3
    return mode.ops


@needs_interpreter  # CPU tensors through the kernels; on a GPU, test_graphs and the bench cover them
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_fused_plumbing_launches_fewer_kernels(monkeypatch, scheduler: str) -> None:
    """fp16 model, channels_last, CFG on: the torch path's cat, cast, channels_last copy, timestep
    copy, upcast and the 3-op combine become the two guidance kernels; the sampler's ops stay."""
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float16, flags=FUSED)
    torch_ops = _count_one_step(pipe, monkeypatch, False, scheduler, 7.5)
    fused_ops = _count_one_step(pipe, monkeypatch, True, scheduler, 7.5)
    print(f"\n{scheduler} one step outside the UNet: torch path {len(torch_ops)} {torch_ops}\n"
          f"  kernel path {len(fused_ops)} {fused_ops}")  # fmt: skip
    kernels = [op for op in fused_ops if op.startswith("triton:")]
    assert kernels == ["triton:cfg_combine", "triton:cfg_input"]
    left = Counter(op for op in fused_ops if not op.startswith("triton:"))
    assert not left - Counter(torch_ops)  # every torch op left is one the torch path ran too
    plumbing = {"cat": 1, "to": 2, "contiguous": 2, "sub": 1, "mul": 1, "add": 1}  # .to: cast in, upcast out
    assert Counter(torch_ops) - left == Counter(plumbing)
    assert len(fused_ops) == len(torch_ops) - 6
    assert "_local_scalar_dense" not in fused_ops  # no host sync (the whole-loop graph captures this)


@needs_interpreter  # CPU tensors through the kernels; on a GPU, test_graphs and the bench cover them
def test_fused_plumbing_only_for_known_input_scalings() -> None:
    """A sampler whose scale_model_input the kernel path does not know keeps the torch path."""
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float32, flags=FUSED)
    x = torch.randn(1, 4, 8, 8)
    for name in ("pndm", "ddim", "dpmpp_2m", "euler", "euler_a"):
        assert denoise.fused_plumbing(pipe, make_scheduler(name), x), name

    class Scaled(DDIMScheduler):
        def scale_model_input(self, sample, t):
            return sample * 0.5

    assert not denoise.fused_plumbing(pipe, Scaled(SD_V1), x)
    assert not denoise.fused_plumbing(pipe.with_flags(ops.PRESETS["reference"]), make_scheduler("ddim"), x)
    assert not denoise.fused_plumbing(pipe, make_scheduler("ddim"), x.double())


@needs_interpreter  # CPU tensors through the kernels; on a GPU, test_graphs and the bench cover them
def test_whole_loop_capture_runs_the_kernel_path(monkeypatch) -> None:
    """denoise_graphed's loop calls denoise_steps(eager=True): that path uses the kernels too."""
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float16, flags=FUSED)
    pipe._unet_forward = _fake_unet
    sched = make_scheduler("ddim")
    sched.set_timesteps(2)
    ts = list(sched.timesteps)
    emb = pipe.text_embeddings(["a cat"], [""], 1, True)
    lat = torch.randn(1, 4, 16, 16) + 0.5
    used = []
    for name in ("cfg_input", "cfg_combine"):
        real = getattr(denoise, name)
        monkeypatch.setattr(denoise, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    t_dev = torch.stack([torch.as_tensor(t) for t in ts])
    got = denoise.denoise_steps(pipe, copy.deepcopy(sched), ts, lat, emb, 7.5, None, None, t_dev, eager=True)
    want = denoise.denoise_steps(pipe, copy.deepcopy(sched), ts, lat, emb, 7.5, None, None, t_dev,
                                 unet_step=pipe.unet_step)  # fmt: skip
    assert used == ["cfg_input", "cfg_combine"] * 2
    torch.testing.assert_close(got, want, atol=0, rtol=0)
