"""The Stable Diffusion 1.x / 2.x denoising UNet, with diffusers' state-dict key names.

    unet = UNet2DCondition(UNET_PRESETS["sd1"])
    unet.load_state_dict(diffusers_unet.state_dict(), strict=True)
    eps = unet(latents, t, text_embeddings)  # [B, 4, h, w], 0-d/[B]/number, [B, 77, 768]

``attention_head_dim`` keeps diffusers' (historically misnamed) meaning: it is the NUMBER of heads
per block — SD 1.x: 8 everywhere (head dims 40/80/160), SD 2.x: (5, 10, 20, 20) (head dim 64). The
mid block uses the last entry; up block i uses entry ``n-1-i`` of the list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speedsd import ops
from speedsd.models.layers import Attention, Conv2d, CrossKV, GroupNorm, ResnetBlock2D, TimeAdds, qkv_groups
from speedsd.models.unet_blocks import AttnSpec, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

IntOrTuple = int | tuple[int, ...]


@dataclass(frozen=True)
class UNetConfig:
    """Geometry of an SD 1.x/2.x UNet; field names and meanings follow diffusers' unet/config.json."""

    sample_size: int | tuple[int, int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    transformer_layers_per_block: IntOrTuple = 1
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: IntOrTuple = 8  # diffusers semantics: number of heads per block
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None  # None: 4 x block_out_channels[0]

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and "
                f"block_out_channels {self.block_out_channels} must have the same length"
            )
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) and len(v) != n:
                raise ValueError(f"{name}={v} must be an int or have one entry per block ({n})")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; speedsd has {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; speedsd has {UP_BLOCK_TYPES}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}")

    def _per_block(self, v: IntOrTuple) -> tuple[int, ...]:
        return (v,) * len(self.block_out_channels) if isinstance(v, int) else tuple(v)

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers' attention_head_dim)."""
        return self._per_block(self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._per_block(self.layers_per_block)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return self._per_block(self.transformer_layers_per_block)

    @property
    def temb_channels(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def replace(self, **changes: Any) -> UNetConfig:
        return dataclasses.replace(self, **changes)

    def attn_spec(self, channels: int, heads: int, layers: int) -> AttnSpec:
        # diffusers: head dim = channels // heads (floor), inner width = heads * head dim
        return AttnSpec(
            heads=heads,
            dim_head=channels // heads,
            context_dim=self.cross_attention_dim,
            layers=layers,
            linear_projection=self.use_linear_projection,
            upcast=self.upcast_attention,
        )

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """Build from a diffusers ``unet/config.json`` dict; unknown keys are ignored.

        Raises ValueError for any feature speedsd's UNet does not implement (SDXL's added
        embeddings, class embeddings, other block types, ...), naming the offending key.
        """
        _check_unsupported(cfg)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if cfg.get(f.name) is None:  # absent or null: our default
                continue
            v = cfg[f.name]
            if isinstance(v, list | tuple):
                v = tuple(v)
                if any(isinstance(e, list | tuple) for e in v):
                    raise ValueError(f"nested per-layer {f.name}={cfg[f.name]} is not supported")
            kw[f.name] = v
        cad = kw.get("cross_attention_dim")
        if isinstance(cad, tuple):
            if len(set(cad)) != 1:
                raise ValueError(f"per-block cross_attention_dim {cad} is not supported")
            kw["cross_attention_dim"] = cad[0]
        return cls(**kw)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel(**kwargs)`` arguments for this geometry."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# key -> the value speedsd implements (other values raise). Checked before the dataclass fields.
_MUST_EQUAL: dict[str, Any] = {
    "addition_embed_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "mid_block_type": MID_BLOCK_TYPE,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

_WHY = {
    "addition_embed_type": " (SDXL-style added text/time embeddings)",
    "class_embed_type": " (class-conditioned UNets)",
    "num_class_embeds": " (class-conditioned UNets)",
    "time_cond_proj_dim": " (LCM guidance embedding)",
    "encoder_hid_dim": " (encoder hidden-state projection)",
}


def _check_unsupported(cfg: Mapping[str, Any]) -> None:
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"_class_name {cfg['_class_name']!r} is not a UNet2DConditionModel")
    for key, want in _MUST_EQUAL.items():
        if key not in cfg:
            continue
        got = cfg[key]
        if key.endswith("only_cross_attention") and not (any(got) if isinstance(got, list | tuple) else got):
            continue  # False, None or an all-False per-block list
        if got != want:
            raise ValueError(
                f"unsupported UNet feature: {key}={got!r}{_WHY.get(key, '')}; speedsd's SD 1.x/2.x UNet "
                f"needs {key}={want!r}"
            )
    if cfg.get("norm_num_groups", 32) is None:
        raise ValueError("unsupported UNet feature: norm_num_groups=None (no output GroupNorm)")


UNET_PRESETS: dict[str, UNetConfig] = {
    # SD 1.4 / 1.5 (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5)
    "sd1": UNetConfig(),
    # A few-MB stand-in with every block type, for smoke tests and the CPU bench (random:tiny)
    "tiny": UNetConfig(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        sample_size=8,
    ),
    # SD 2.0 / 2.1 base (512px, epsilon prediction)
    "sd2": UNetConfig().replace(
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
    ),
    # SD 2.1 768-v (v-prediction): attention scores in fp32
    "sd2-v": UNetConfig().replace(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps [B] -> [B, dim] (fp32).

    freq_k = exp(-ln(10000) · k / (dim/2 - freq_shift)), k < dim/2; emb = [sin(t·f), cos(t·f)],
    or [cos, sin] with flip_sin_to_cos; an odd dim gets one zero column.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]  # [B] x [half] -> [B, half]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 → SiLU → linear_2 (diffusers' ``time_embedding``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2DCondition(nn.Module):
    """SD 1.x/2.x noise-prediction UNet; parameter names equal diffusers' UNet2DConditionModel keys."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        ch, groups, eps, temb = c.block_out_channels, c.norm_num_groups, c.norm_eps, c.temb_channels
        n = len(ch)
        heads, layers, tlayers = c.num_heads, c.layers, c.transformer_layers

        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            attn = c.attn_spec(ch[i], heads[i], tlayers[i]) if kind == "CrossAttnDownBlock2D" else None
            self.down_blocks.append(
                DownBlock2D(
                    ch[max(i - 1, 0)], ch[i], temb, layers[i], groups, eps, attn, i < n - 1, c.downsample_padding
                )
            )

        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb, groups, eps, c.attn_spec(ch[-1], heads[-1], tlayers[-1]))

        self.up_blocks = nn.ModuleList()
        rch, rheads, rlayers, rtlayers = ch[::-1], heads[::-1], layers[::-1], tlayers[::-1]
        for i, kind in enumerate(c.up_block_types):
            attn = c.attn_spec(rch[i], rheads[i], rtlayers[i]) if kind == "CrossAttnUpBlock2D" else None
            skip_ch = rch[min(i + 1, n - 1)]  # channels of the level above's skip
            prev_ch = rch[max(i - 1, 0)]
            self.up_blocks.append(
                UpBlock2D(skip_ch, prev_ch, rch[i], temb, rlayers[i] + 1, groups, eps, attn, i < n - 1)
            )

        self.conv_norm_out = GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)
        self._temb_cache: dict[str, object] = {}
        self._kv_cache: dict[str, object] = {}
        self._scoped_kv: dict[str, object] | None = None
        # the blocks whose projections run as one GEMM each forward (the structure never changes)
        self._temb_resnets = [m for m in self.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
        self._cross_attns = [m for n, m in self.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]

    def weight_groups(self) -> list[list[str]]:
        """Weights fused at run time, each group in the order it is fused (see :mod:`speedsd.arena`):
        self-attention Q/K/V, every cross-attention's K/V (CrossKV), every time-embedding projection
        (TimeAdds)."""
        names = {id(m): n for n, m in self.named_modules()}
        groups = qkv_groups(self)
        for kind in ("weight", "bias"):
            kv = [f"{names[id(a)]}.to_{x}.{kind}" for a in self._cross_attns for x in "kv"]
            if kind == "weight" or (self._cross_attns and self._cross_attns[0].to_k.bias is not None):
                groups.append(kv)
        groups.append([f"{names[id(r)]}.time_emb_proj.weight" for r in self._temb_resnets])
        return [g for g in groups if g]

    @contextlib.contextmanager
    def context_scope(self) -> Iterator[None]:
        """Within this block every forward given the SAME context tensor (same object) reuses its
        cross-attention K/V (with ``Flags.fused_qkv``): a denoising loop could project the text once, not
        once a step. Only for callers that do not change that tensor in place inside the block. It is also
        an :func:`speedsd.ops.loop_scope`: the 16² and 32² upsamplers run as sub-pixel convs on weights
        folded once for the block. The denoising loop (:mod:`speedsd.denoise`) runs in one scope when
        eager and when captured whole."""
        prev, self._scoped_kv = self._scoped_kv, {}
        try:
            with ops.loop_scope():
                yield
        finally:
            self._scoped_kv = prev

    def _context(self, context: torch.Tensor) -> torch.Tensor | CrossKV:
        if not ops.current().fused_qkv:
            return context
        scoped = self._scoped_kv
        if scoped is not None and scoped.get("context") is context:
            return scoped["kv"]  # type: ignore[return-value]
        kv = CrossKV.build(self._cross_attns, context, self._kv_cache)
        if scoped is not None:
            scoped["context"], scoped["kv"] = context, kv
        return kv

    def time_adds(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Every ResNet block's time pre-add for each of S timesteps, [S] -> [S, ΣC], in one batch: a
        denoising loop computes them once and passes row i to step i's :meth:`forward`. None without
        ``Flags.fused_epilogues`` (then the blocks project the time embedding themselves)."""
        return self._time_adds(timesteps.reshape(-1), self.conv_in.weight.dtype)

    def _time_adds(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if not ops.current().fused_epilogues or not self._temb_resnets:
            return None
        return TimeAdds.project(self._temb_resnets, self._time_embedding(t, dtype), self._temb_cache)

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Timesteps [B] -> time_embedding(sinusoid) [B, T] in ``dtype``."""
        c = self.config
        return self.time_embedding(
            timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(dtype)
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        time_adds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B, C_in, h, w], timestep 0-d / [B] / [1] / number, text [B, M, Dc] -> [B, C_out, h, w].

        ``time_adds``: this timestep's row of :meth:`time_adds` ([ΣC], or [B, ΣC]), computed ahead;
        then ``timestep`` is not read (with fused epilogues; otherwise it is ignored)."""
        c = self.config
        b = sample.shape[0]
        if not (ops.current().fused_epilogues and self._temb_resnets):
            time_adds = None  # the blocks project the time embedding themselves
        if time_adds is None:
            t = torch.as_tensor(timestep, device=sample.device)
            t = t.reshape(-1).expand(b)  # 0-d or [1] -> [B]
            time_adds = self._time_adds(t, sample.dtype)  # every block's projection in one GEMM (fused)
            temb = self._time_embedding(t, sample.dtype) if time_adds is None else None
        if time_adds is not None:
            temb = TimeAdds.split(self._temb_resnets, time_adds.reshape(-1, time_adds.shape[-1]).expand(b, -1))
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        encoder_hidden_states = self._context(encoder_hidden_states)  # a CrossKV with fused_qkv
        x = self.conv_in(sample)
        skips = [x]
        for down in self.down_blocks:
            x, s = down(x, temb, encoder_hidden_states)
            skips.extend(s)

        x = self.mid_block(x, temb, encoder_hidden_states)

        for up in self.up_blocks:
            k = len(up.resnets)
            mine, skips = skips[-k:], skips[:-k]
            # upsample to the next skip's size: odd latent sizes do not round-trip through stride 2
            size = tuple(skips[-1].shape[-2:]) if len(up.upsamplers) else None
            x = up(x, mine, temb, encoder_hidden_states, size)

        return ops.norm_silu_conv_op(x, self.conv_norm_out, self.conv_out)
