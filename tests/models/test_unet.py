"""speedsd's UNet against diffusers' UNet2DConditionModel with the same (random) weights, fp32 on CPU."""

from __future__ import annotations

import os
from unittest.mock import patch

import pytest
import torch

from speedsd import ops
from speedsd.models.layers import CrossKV
from speedsd.models.unet import UNET_PRESETS, UNet2DCondition, UNetConfig

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

RTOL = 1e-4  # ‖ours − ref‖ / ‖ref‖ in fp32

# Three levels like SD's four: cross-attn levels with and without a channel change, a plain level at
# the bottom, so every resnet shortcut / skip-channel case of the up path appears.
TINY_SD1 = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=2,  # SD1 semantics: 2 heads everywhere -> head dims 16, 32
)
TINY_SD2 = TINY_SD1.replace(
    cross_attention_dim=40,
    attention_head_dim=(2, 4, 4),  # SD2 semantics: heads per block, head dim 16
    use_linear_projection=True,
    upcast_attention=True,
)
# The less common knobs the config carries, all at once.
TINY_ODD = TINY_SD1.replace(
    layers_per_block=1,
    transformer_layers_per_block=2,
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=True,
    time_embedding_dim=48,
    attention_head_dim=(1, 2, 4),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
)
CONFIGS = {"sd1-tiny": TINY_SD1, "sd2-tiny": TINY_SD2, "odd-knobs": TINY_ODD}

_cache: dict[str, tuple[torch.nn.Module, UNet2DCondition]] = {}


def _models(name: str) -> tuple[torch.nn.Module, UNet2DCondition]:
    """(diffusers reference, ours) with identical weights; norms/biases perturbed off their init."""
    if name not in _cache:
        torch.manual_seed(1)
        ref = UNet2DConditionModel(**CONFIGS[name].to_diffusers()).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # GroupNorm/LayerNorm affines != (1, 0), biases != 0
        ours = UNet2DCondition(CONFIGS[name]).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        _cache[name] = (ref, ours)
    return _cache[name]


def _inputs(cfg: UNetConfig, b: int, h: int, w: int, m: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(b, cfg.in_channels, h, w) * 2 + 0.5
    ctx = torch.randn(b, m, cfg.cross_attention_dim) * 2 + 0.5
    return x, ctx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (label, batch, h, w, timestep): a square latent with a scalar step, odd latents with one step per sample
SHAPES = [
    ("16x16-b1-int", 1, 16, 16, 500),
    ("9x11-b2-per-sample", 2, 9, 11, torch.tensor([10.0, 981.0])),
    ("13x7-b2-0d", 2, 13, 7, torch.tensor(251)),
]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("label,b,h,w,t", SHAPES, ids=[s[0] for s in SHAPES])
@torch.no_grad()
def test_matches_diffusers(name: str, label: str, b: int, h: int, w: int, t: torch.Tensor | int) -> None:
    ref, ours = _models(name)
    x, ctx = _inputs(CONFIGS[name], b, h, w)
    want = ref(x, t, ctx).sample
    got = ours(x, t, ctx)
    assert got.shape == (b, 4, h, w)
    assert torch.isfinite(got).all()
    assert want.abs().mean() > 0.1  # a meaningful reference, not a collapsed one
    assert _rel(got, want) <= RTOL


@torch.no_grad()
def test_timestep_forms_and_batch_independence() -> None:
    _, ours = _models("sd1-tiny")
    x, ctx = _inputs(TINY_SD1, 2, 9, 11)
    base = ours(x, torch.tensor([700, 700]), ctx)
    for t in (700, 700.0, torch.tensor(700), torch.tensor([700]), torch.tensor([700.0, 700.0])):
        torch.testing.assert_close(ours(x, t, ctx), base, rtol=1e-6, atol=1e-6)
    # per-sample steps: each row equals that sample run alone with its own step
    both = ours(x, torch.tensor([3, 940]), ctx)
    for i, ti in enumerate((3, 940)):
        alone = ours(x[i : i + 1], ti, ctx[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert _rel(both[1:], base[1:]) > 1e-2  # the step actually matters


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny"])
@torch.no_grad()
def test_channels_last_matches_nchw(name: str) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(2)
    model = UNet2DCondition(cfg).eval()
    x, ctx = _inputs(cfg, 2, 9, 11)
    want = model(x, torch.tensor([20, 600]), ctx)
    model.to(memory_format=torch.channels_last)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got = model(x_cl, torch.tensor([20, 600]), ctx)
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("mode", ops.ATTENTION_MODES)
@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny"])
@torch.no_grad()
def test_attention_modes_match_diffusers(name: str, mode: str) -> None:
    """Every attention implementation the CPU can run (Triton ones under TRITON_INTERPRET=1)."""
    if mode in ("partial", "flash", "cross") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (CUDA machines: tests/test_graphs.py)")
    ref, ours = _models(name)
    x, ctx = _inputs(CONFIGS[name], 1, 8, 8)
    want = ref(x, 400, ctx).sample
    try:
        with ops.using(ops.Flags(attention=mode)):
            got = ours(x, 400, ctx)
    except NotImplementedError as e:
        pytest.skip(f"attention={mode}: {e}")
    assert _rel(got, want) <= RTOL


@pytest.mark.parametrize(
    "flags",
    [ops.Flags(fused_qkv=True), ops.Flags(group_norm=True), ops.Flags(gelu=True)],
    ids=["fused_qkv", "group_norm", "gelu"],
)
@torch.no_grad()
def test_other_flags_match_diffusers(flags: ops.Flags) -> None:
    if (flags.group_norm or flags.gelu) and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (CUDA machines: tests/test_graphs.py)")
    ref, ours = _models("sd1-tiny")
    x, ctx = _inputs(TINY_SD1, 1, 8, 8)
    want = ref(x, 400, ctx).sample
    try:
        with ops.using(flags):
            got = ours(x, 400, ctx)
    except NotImplementedError as e:
        pytest.skip(str(e))
    assert _rel(got, want) <= RTOL


@torch.no_grad()
def test_fused_path_leaves_inputs_unchanged() -> None:
    """The fused path's norms write in place over the blocks' own tensors only: the inputs stay as they
    were, and so do the skip connections (else the output would leave diffusers')."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (CUDA machines: tests/test_graphs.py)")
    ref, ours = _models("sd1-tiny")
    x, ctx = _inputs(TINY_SD1, 2, 8, 8)
    t = torch.tensor([400, 30])
    want = ref(x, t, ctx).sample
    x0, ctx0, t0 = x.clone(), ctx.clone(), t.clone()
    with ops.using(ops.PRESETS["fast"].replace(cuda_graphs=False)):
        got = ours(x, t, ctx)
    assert torch.equal(x, x0) and torch.equal(ctx, ctx0) and torch.equal(t, t0)
    assert _rel(got, want) <= RTOL


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS) + list(UNET_PRESETS))
def test_from_diffusers_round_trip(name: str) -> None:
    cfg = CONFIGS.get(name) or UNET_PRESETS[name]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**cfg.to_diffusers())
    full = dict(ref.config)  # every diffusers key, defaults included, as config.json would hold it
    full["_class_name"] = "UNet2DConditionModel"
    full["_diffusers_version"] = "0.42.1"
    full["some_future_key"] = 1
    assert UNetConfig.from_diffusers(full) == cfg


def test_presets_match_published_configs() -> None:
    # the fields that differ between the SD 1.x and 2.x unet/config.json files on the hub
    sd1, sd2, sd2v = UNET_PRESETS["sd1"], UNET_PRESETS["sd2"], UNET_PRESETS["sd2-v"]
    assert (sd1.cross_attention_dim, sd1.attention_head_dim, sd1.use_linear_projection) == (768, 8, False)
    assert (sd2.cross_attention_dim, sd2.attention_head_dim, sd2.use_linear_projection) == (1024, (5, 10, 20, 20), True)
    assert not sd2.upcast_attention and sd2v.upcast_attention and sd2v.sample_size == 96
    assert sd2.num_heads == (5, 10, 20, 20)
    assert [c // h for c, h in zip(sd2.block_out_channels, sd2.num_heads)] == [64, 64, 64, 64]
    assert [c // h for c, h in zip(sd1.block_out_channels, sd1.num_heads)] == [40, 80, 160, 160]


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"addition_embed_type": "text_time", "addition_time_embed_dim": 256}, "SDXL"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "AttnUpBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"only_cross_attention": [True, False]}, "only_cross_attention"),
        ({"cross_attention_dim": [24, 32]}, "cross_attention_dim"),
    ],
)
def test_from_diffusers_rejects_unsupported(changes: dict, match: str) -> None:
    base = {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 24,
        "norm_num_groups": 8,
    }
    UNetConfig.from_diffusers(base)  # the base itself is fine
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers({**base, **changes})


# ---- the real SD-1.4 geometry -----------------------------------------------------------------


def test_sd14_geometry_keys_and_shapes() -> None:
    cfg = UNET_PRESETS["sd1"]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**cfg.to_diffusers())
        ours = UNet2DCondition(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(want)
    assert got == want
    assert len(got) == 686 and sum(v.numel() for v in ours.parameters()) == 859_520_964


@torch.no_grad()
def test_sd14_forward_matches_diffusers() -> None:
    """One forward at the real geometry (860M params; ~3.5 GB: ours shares the reference's tensors)."""
    cfg = UNET_PRESETS["sd1"]
    torch.manual_seed(3)
    ref = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    with torch.device("meta"):
        ours = UNet2DCondition(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    x, ctx = _inputs(cfg, 1, 16, 16, m=77)
    want = ref(x, torch.tensor([801]), ctx).sample
    got = ours(x, torch.tensor([801]), ctx)
    assert _rel(got, want) <= RTOL


@torch.no_grad()
def test_context_scope_runs_small_upsamplers_as_subpixel_convs(monkeypatch) -> None:
    """Inside context_scope (an ops.loop_scope) the upsampler below SUBPIXEL_MIN_PIXELS runs as the
    sub-pixel conv on a weight folded once for the scope; the UNet still matches diffusers."""
    ref, ours = _models("sd1-tiny")
    x, ctx = _inputs(TINY_SD1, 1, 8, 8)
    monkeypatch.setattr(ops, "SUBPIXEL_LOOP_MIN_PIXELS", 1)
    folds, convs = [], []

    def counting(real):
        return lambda w: folds.append(1) or real(w)

    for name in ("subpixel_weight", "subpixel_weight_ref"):  # the kernel where Triton runs, else torch
        monkeypatch.setattr(ops, name, counting(getattr(ops, name)))
    real_conv = ops.subpixel_upsample_conv
    monkeypatch.setattr(ops, "subpixel_upsample_conv", lambda *a, **kw: convs.append(1) or real_conv(*a, **kw))
    upsamplers = sum(len(u.upsamplers) for u in ours.up_blocks)
    assert upsamplers >= 1
    with ops.using(ops.Flags(subpixel_upsample=True)):
        ours(x, 400, ctx)
        assert convs == []  # outside a scope: 4x4 inputs stay plain
        with ours.context_scope():
            a = ours(x, 400, ctx)
            b = ours(x, 300, ctx)
        assert (len(convs), len(folds)) == (2 * upsamplers, upsamplers)
    assert _rel(a, ref(x, 400, ctx).sample) <= RTOL
    assert _rel(b, ref(x, 300, ctx).sample) <= RTOL


@torch.no_grad()
def test_context_scope_projects_the_text_once() -> None:
    """With fused_qkv every cross-attention K/V comes from one GEMM (CrossKV); inside context_scope a
    second forward on the same context object reuses it, a new context object is projected anew."""
    ref, ours = _models("sd1-tiny")
    x, ctx = _inputs(TINY_SD1, 1, 8, 8)
    ctx2 = ctx.flip(1) + 0.5
    calls = []
    real = CrossKV.build

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with ops.using(ops.Flags(fused_qkv=True)), patch.object(CrossKV, "build", staticmethod(counting)):
        with ours.context_scope():
            a = ours(x, 400, ctx)
            b = ours(x, 300, ctx)
            c = ours(x, 400, ctx2)
        assert len(calls) == 2
        ours(x, 400, ctx)  # outside a scope: projected every call
        assert len(calls) == 3
    assert _rel(a, ref(x, 400, ctx).sample) <= RTOL
    assert _rel(b, ref(x, 300, ctx).sample) <= RTOL
    assert _rel(c, ref(x, 400, ctx2).sample) <= RTOL
