"""The SD UNet's transformer and its down / mid / up blocks.

Module names mirror diffusers' ``Transformer2DModel``, ``BasicTransformerBlock``,
``CrossAttnDownBlock2D`` / ``DownBlock2D``, ``UNetMidBlock2DCrossAttn`` and ``UpBlock2D`` /
``CrossAttnUpBlock2D`` so a diffusers state dict loads without renaming. A block without attention is
the same class with an empty ``attentions`` list (an empty ModuleList owns no state-dict keys).
All norms, convs, attention and GEGLU go through :mod:`speedsd.models.layers` (hence
:mod:`speedsd.ops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from speedsd import ops
from speedsd.models.layers import (
    Attention,
    Conv2d,
    Downsample2D,
    FeedForward,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    Upsample2D,
)
from speedsd.models.skip_concat import Concat

# diffusers' Transformer2DModel hard-codes this GroupNorm eps, whatever the UNet's norm_eps.
TRANSFORMER_GROUP_NORM_EPS = 1e-6


@dataclass(frozen=True)
class AttnSpec:
    """How one block's Transformer2D layers are built (None for a block without attention)."""

    heads: int
    dim_head: int
    context_dim: int
    layers: int = 1  # BasicTransformerBlocks per Transformer2D (transformer_layers_per_block)
    linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv
    upcast: bool = False  # attention scores in fp32 (SD 2.1-768)


class BasicTransformerBlock(nn.Module):
    """LayerNorm → self-attention, LayerNorm → cross-attention, LayerNorm → GEGLU FF; each residual."""

    def __init__(self, dim: int, spec: AttnSpec) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, None, spec.heads, spec.dim_head, bias=False, upcast=spec.upcast)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, spec.context_dim, spec.heads, spec.dim_head, bias=False, upcast=spec.upcast)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x_bias`` [C]: a bias x's producer (proj_in) left out; added where x is first read."""
        if ops.current().fused_epilogues:
            return self._forward_fused(x, context, x_bias)
        if x_bias is not None:
            x = x + x_bias
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def _forward_fused(self, x: torch.Tensor, context: torch.Tensor, x_bias: torch.Tensor | None) -> torch.Tensor:
        # every residual add (with the projection bias) shares a pass with the next LayerNorm; proj_in's
        # bias (x_bias) joins norm1's read and the first residual add, so its GEMM has no bias epilogue
        n = ops.layer_norm_op(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, x_bias=x_bias)
        a = self.attn1(n, out_bias=False)
        x, n = ops.add_layer_norm_op(
            x, a, self.norm2.weight, self.norm2.bias, self.norm2.eps, self.attn1.to_out[0].bias, x_bias=x_bias
        )
        a = self.attn2(n, context, out_bias=False)
        # the stored residual already holds net.2's bias: the FF's last GEMM accumulates into it (beta = 1)
        x, n = ops.add_layer_norm_op(
            x, a, self.norm3.weight, self.norm3.bias, self.norm3.eps, self.attn2.to_out[0].bias,
            s_bias=self.ff.net[2].bias,
        )  # fmt: skip
        return self.ff(n, accumulate_into=x)


class Transformer2D(nn.Module):
    """GroupNorm → proj_in → N transformer blocks over the H·W tokens → proj_out, plus the input.

    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers on the tokens (SD 2.x); both orders
    reshape with permute+reshape, which is a free view when the input is channels_last.
    """

    def __init__(self, channels: int, groups: int, spec: AttnSpec) -> None:
        super().__init__()
        inner = spec.heads * spec.dim_head
        self.linear_projection = spec.linear_projection
        self.norm = GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        if spec.linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = Conv2d(channels, inner, 1)
            self.proj_out = Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, spec) for _ in range(spec.layers)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, hand_over: bool = True) -> torch.Tensor:
        """``hand_over``: the output's next reader is a GroupNorm (see ResnetBlock2D.forward)."""
        b, _, h, w = x.shape
        fused = ops.current().fused_epilogues  # proj_out's bias and the residual: one pass at the end
        # fused: proj_in's bias joins the first block's norm1 and residual add (no bias epilogue: cuBLAS's
        # costs ~4 µs a call at 64², unet_step_trace_h200_1c81dc7.json)
        late = self.proj_in.bias if fused and len(self.transformer_blocks) else None
        t = self.norm(x)
        if not self.linear_projection:
            t = self.proj_in(t, with_bias=late is None)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # [B, C, H, W] -> [B, HW, C]
        if self.linear_projection:
            t = self.proj_in(t) if late is None else ops.linear_op(t, self.proj_in.weight)
        for i, block in enumerate(self.transformer_blocks):
            t = block(t, context, x_bias=late if i == 0 else None)
        if self.linear_projection:
            t = ops.linear_op(t, self.proj_out.weight, None if fused else self.proj_out.bias)
        t = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # [B, HW, C] -> [B, C, H, W] (channels_last strides)
        if not ops.current().channels_last:
            t = t.contiguous()  # NCHW engine: keep every activation in one layout
        if not self.linear_projection:
            t = self.proj_out(t, with_bias=not fused)
        if fused:
            groups = self.norm.num_groups if hand_over else None
            return ops.bias_add_op(t, self.proj_out.bias, residual=x, inplace=True, next_groups=groups)
        return t + x


class DownBlock2D(nn.Module):
    """``layers`` x (ResnetBlock2D [+ Transformer2D]), then an optional stride-2 conv.

    Returns the output and every intermediate the up path takes as a skip connection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        layers: int,
        groups: int,
        eps: float,
        attn: AttnSpec | None,
        add_downsample: bool,
        downsample_padding: int = 1,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
                for i in range(layers)
            ]
        )
        self.attentions = nn.ModuleList(
            [Transformer2D(out_channels, groups, attn) for _ in range(layers)] if attn is not None else []
        )
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_channels, padding=downsample_padding)] if add_downsample else []
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        last = len(self.resnets) - 1
        to_norm = not len(self.downsamplers)  # after the last layer: the next block's GroupNorm or a conv
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, hand_over=bool(len(self.attentions)) or i < last or to_norm)
            if len(self.attentions):
                x = self.attentions[i](x, context, hand_over=i < last or to_norm)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResnetBlock2D → Transformer2D → ResnetBlock2D at the lowest resolution."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, attn: AttnSpec) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(channels, groups, attn)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb, hand_over=False)  # the up path concatenates it with a skip first


class UpBlock2D(nn.Module):
    """``layers`` x (concat a skip → ResnetBlock2D [+ Transformer2D]), then an optional upsampler.

    Resnet j sees ``prev_channels`` (j = 0) or ``out_channels`` from below, concatenated with a skip of
    ``skip_channels`` (the last one, from the level above) or ``out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        prev_channels: int,
        out_channels: int,
        temb_channels: int,
        layers: int,
        groups: int,
        eps: float,
        attn: AttnSpec | None,
        add_upsample: bool,
    ) -> None:
        super().__init__()
        resnets = []
        for j in range(layers):
            skip_ch = in_channels if j == layers - 1 else out_channels
            below_ch = prev_channels if j == 0 else out_channels
            resnets.append(ResnetBlock2D(below_ch + skip_ch, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            [Transformer2D(out_channels, groups, attn) for _ in range(layers)] if attn is not None else []
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``skips`` in down-path order; they are consumed from the end."""
        # a layer's output meets a concat or the upsampler next, except the UNet's last (conv_norm_out)
        last = len(self.resnets) - 1
        fused = ops.current().fused_epilogues
        for i, resnet in enumerate(self.resnets):
            # [B, C, H, W] ++ [B, Cs, H, W] -> [B, C+Cs, H, W]; with fused epilogues a box, never formed: its
            # readers (norm1, the shortcut) take both parts (models/skip_concat.py), and x goes with the box
            x = Concat(x, skips[-1 - i]) if fused else torch.cat([x, skips[-1 - i]], dim=1)
            to_norm = i == last and not len(self.upsamplers)
            x = resnet(x, temb, hand_over=bool(len(self.attentions)) or to_norm)
            if len(self.attentions):
                x = self.attentions[i](x, context, hand_over=to_norm)
        for up in self.upsamplers:
            x = up(x, upsample_size)
        return x
