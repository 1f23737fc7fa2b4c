"""Building blocks shared by the UNet and the VAE.

Module and parameter names mirror the diffusers checkpoint keys (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...), so a diffusers state dict loads
with no renaming. Every op that a kernel can replace goes through :mod:`speedsd.ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedsd import ops


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose forward (optionally with a fused SiLU) goes through the dispatch module."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return ops.group_norm_op(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm_op(x, self.weight, self.bias, self.eps)


class Conv2d(nn.Conv2d):
    """nn.Conv2d routed through the dispatch module (3x3 layers may run as Winograd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d_op(x, self)


class ResnetBlock2D(nn.Module):
    """GroupNorm+SiLU → conv3x3 (+ time embedding) → GroupNorm+SiLU → conv3x3, plus a shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int = 32, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE pads (0, 1, 0, 1) itself and convolves with padding 0."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # odd latent sizes: the UNet asks for the skip connection's size
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names.

    Token form (UNet): x [B, N, C], optional context [B, M, Cc] for cross-attention.
    Spatial form (VAE mid block, ``norm_groups`` set): x [B, C, H, W]; GroupNorm first, residual
    added after ``to_out``.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        upcast: bool = False,
        norm_groups: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.group_norm = GroupNorm(norm_groups, query_dim, eps=norm_eps) if norm_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # to_out.1 is dropout: no params
        self._qkv: tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def _fused_qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[3·inner, C] weight (and bias) for one GEMM; rebuilt when a projection weight changes."""
        ps = [self.to_q, self.to_k, self.to_v]
        key = tuple(t._version for p in ps for t in (p.weight, p.bias) if t is not None)
        key += tuple(p.weight.data_ptr() for p in ps)
        if self._qkv is None or self._qkv[0] != key:
            w = torch.cat([p.weight for p in ps]).detach()
            b = torch.cat([p.bias for p in ps]).detach() if self.to_q.bias is not None else None
            self._qkv = (key, w, b)
        return self._qkv[1], self._qkv[2]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        if self.group_norm is not None:
            b, c, h, w = x.shape
            x = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        B, N, _ = x.shape
        if context is None and ops.current().fused_qkv:
            wqkv, bqkv = self._fused_qkv_weight()
            q, k, v = F.linear(x, wqkv, bqkv).chunk(3, dim=-1)
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        # [B, N, H·D] -> [B, H, N, D]
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        out = ops.attention_op(q, k, v, upcast=self.upcast)
        out = self.to_out[0](out.transpose(1, 2).flatten(2))  # [B, H, N, D] -> [B, N, H·D] -> [B, N, C]
        if self.group_norm is not None:
            out = out.transpose(1, 2).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
            return out + residual
        return out


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` to 2x the hidden width, value·GELU(gate), ``net.2`` back."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        hidden = dim * mult
        self.net = nn.ModuleList([_GEGLU(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.net[0].proj
        return self.net[2](ops.feed_forward_geglu_op(x, proj.weight, proj.bias))


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
