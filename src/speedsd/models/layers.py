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
from speedsd.models.fused_rows import derived, fused_rows
from speedsd.models.skip_concat import Concat, split_shortcut


class Owned:
    """A tensor handed over to a callee, which may overwrite it and frees it as soon as it is dead.

    ``x = block(x)`` keeps the input alive in the caller's frame until ``block`` returns. With a box,
    ``x = Owned(block(x))`` (x already a box), the caller holds only the box and the callee
    :meth:`take` s the tensor out. Only for tensors nothing else references (a model's own
    intermediates): the VAE decoder hands its activations down so; the UNet (its ResNet inputs are
    also skip connections) and the encoder (its input is the caller's image) do not.
    """

    __slots__ = ("_t",)

    def __init__(self, t: torch.Tensor) -> None:
        self._t: torch.Tensor | None = t

    def take(self) -> torch.Tensor:
        """The tensor; the box is empty afterwards (a tensor is handed over once)."""
        if self._t is None:
            raise RuntimeError("this Owned box was already taken")
        t, self._t = self._t, None
        return t

    @staticmethod
    def unbox(x: torch.Tensor | Owned) -> torch.Tensor:
        return x.take() if isinstance(x, Owned) else x

    @staticmethod
    def like(x: torch.Tensor | Owned, out: torch.Tensor) -> torch.Tensor | Owned:
        """``out``, boxed if the input ``x`` came boxed: ownership passes on the way it came in."""
        return Owned(out) if isinstance(x, Owned) else out


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose forward (optionally with a fused SiLU) goes through the dispatch module."""

    def forward(
        self,
        x: torch.Tensor,
        silu: bool = False,
        add: torch.Tensor | None = None,
        inplace: bool = False,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """GroupNorm(x + add) (+ SiLU); ``add`` is a [C] or [N, C] vector; ``inplace``: x is dead after
        this call and the kernel may write over it; ``concat``: of cat([x, concat], dim=1) (ops.group_norm_op)."""
        return ops.group_norm_op(
            x, self.num_groups, self.weight, self.bias, self.eps, silu=silu, add=add, inplace=inplace, concat=concat
        )


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm_op(x, self.weight, self.bias, self.eps)


class Conv2d(nn.Conv2d):
    """nn.Conv2d routed through the dispatch module (3x3 layers may run as Winograd)."""

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        return ops.conv2d_op(x, self, with_bias)


class CrossKV:
    """Every cross-attention layer's K and V projections of the text context, from ONE GEMM.

    The text context is the same at every layer and every denoising step, so the UNet projects it for
    all its cross-attention layers at once (their to_k/to_v weights are fused rows, views, no copy) and
    hands this object down in place of the context; within :meth:`UNet2DCondition.context_scope` it is
    computed once and reused by every step. ``kv[attn]`` is that layer's ([B, M, C], [B, M, C]).
    """

    def __init__(self, slices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._slices = slices

    def __getitem__(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slices[id(attn)]

    @staticmethod
    def build(attns: list[Attention], context: torch.Tensor, cache: dict[str, object]) -> CrossKV:
        """``cache``: the caller's dict holding the fused weight between calls."""
        projs = [p for a in attns for p in (a.to_k, a.to_v)]
        w = fused_rows([p.weight for p in projs], cache.get("w"))  # [Σ 2C, Cc]
        cache["w"] = w
        b = None
        if all(p.bias is not None for p in projs):
            b = fused_rows([p.bias for p in projs], cache.get("b"))
            cache["b"] = b
        elif any(p.bias is not None for p in projs):
            raise ValueError("cross-attention K/V projections mix biased and bias-free layers")
        out = F.linear(context, w, b)  # [B, M, Σ 2C]
        parts = out.split([p.out_features for p in projs], dim=-1)  # strided [B, M, C] views, no copies
        return CrossKV({id(a): (parts[2 * i], parts[2 * i + 1]) for i, a in enumerate(attns)})


class TimeAdds:
    """Every ResNet block's norm2 pre-add, time_emb_proj(SiLU(temb)) + conv1.bias, from ONE GEMM.

    :meth:`project` maps the time embedding to every block's pre-add at once (per forward, or once per
    denoising loop for every step's timestep), :meth:`split` gives the blocks their views: the blocks'
    time_emb_proj weights are fused rows (views, no copy) of one [ΣC, T] matrix, so 22 SiLU + GEMM +
    add launches become one of each. ``adds[resnet]`` is that block's [B, C] slice.
    """

    def __init__(self, slices: dict[int, torch.Tensor]) -> None:
        self._slices = slices

    def __getitem__(self, resnet: nn.Module) -> torch.Tensor:
        return self._slices[id(resnet)]

    @staticmethod
    def project(resnets: list[ResnetBlock2D], temb: torch.Tensor, cache: dict[str, object]) -> torch.Tensor:
        """temb [B, T] -> every block's pre-add side by side, [B, ΣC]. ``cache``: the caller's dict
        holding the fused weight and combined bias between calls."""
        projs = [r.time_emb_proj for r in resnets]
        w = fused_rows([p.weight for p in projs], cache.get("w"))  # [ΣC, T]
        biases = [t for r in resnets for t in (r.time_emb_proj.bias, r.conv1.bias)]
        # the derived [ΣC] bias: time_emb_proj.bias + conv1.bias per block
        b = derived(
            cache.setdefault("b", {}), biases, lambda: torch.cat([r.time_emb_proj.bias + r.conv1.bias for r in resnets])
        )
        cache["w"] = w
        return F.linear(F.silu(temb), w, b)  # [B, ΣC]

    @staticmethod
    def split(resnets: list[ResnetBlock2D], adds: torch.Tensor) -> TimeAdds:
        """[B, ΣC] from :meth:`project` -> the blocks' strided [B, C] views, no copies."""
        parts = adds.split([r.time_emb_proj.out_features for r in resnets], dim=1)
        return TimeAdds({id(r): t for r, t in zip(resnets, parts)})


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
        self._closing: dict[str, object] = {}  # conv2.bias + the shortcut conv's bias (derived)

    def forward(
        self, x: torch.Tensor | Owned | Concat, temb: torch.Tensor | None = None, hand_over: bool = True
    ) -> torch.Tensor:
        """``x``: the input, or an :class:`Owned` box handing it over: with a conv shortcut, the shortcut
        runs first, norm1 writes over x and x is freed once conv1 has read it (live at most: x, the
        shortcut, conv1's output; else x, norm1's and conv1's outputs, and x to the end). An identity
        shortcut keeps x as the residual. norm2 always writes over conv1's output. Same ops and values.
        Or a :class:`Concat` box (the up path's cat([x, skip])): with fused epilogues and a conv shortcut it
        is never formed (the split shortcut first, then norm1 of both parts; x is freed then), else formed.
        ``hand_over``: the output's next reader is a GroupNorm (of this block's group count), which
        may then take its statistics from the closing add (fused epilogues)."""
        if ops.current().fused_epilogues:
            return self._forward_fused(x, temb, hand_over)
        if isinstance(x, Concat):
            x = x.materialize()
        x, h, shortcut = self._norm1(x, shortcut_bias=True)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.norm2(h, silu=True, inplace=True)
        h = self.conv2(h)
        if shortcut is None:
            shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h

    def _norm1(
        self, x: torch.Tensor | Owned | Concat, shortcut_bias: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(x, SiLU(norm1(x)), None), or for an Owned x with a conv shortcut (None, the same written over
        x, the shortcut conv computed first): the order of forward's doc; no reference to x is kept."""
        if isinstance(x, Concat):
            if self.conv_shortcut is None:
                return self._norm1(x.materialize(), shortcut_bias)  # the concatenation is the residual
            x, skip = x.take()
            b = self.conv_shortcut.bias if shortcut_bias else None
            shortcut = split_shortcut(x, skip, self.conv_shortcut, b)
            return None, self.norm1(x, silu=True, concat=skip), shortcut
        if isinstance(x, Owned) and self.conv_shortcut is not None:
            x = x.take()
            shortcut = self.conv_shortcut(x, with_bias=shortcut_bias)
            return None, self.norm1(x, silu=True, inplace=True), shortcut
        x = Owned.unbox(x)
        return x, self.norm1(x, silu=True), None

    def _forward_fused(
        self, x: torch.Tensor | Owned | Concat, temb: torch.Tensor | TimeAdds | None, hand_over: bool
    ) -> torch.Tensor:
        # conv1's bias and the time embedding enter norm2 as one [B, C] pre-add; conv2's (and the
        # shortcut conv's) bias and the residual are one pass written over conv2's output. Where the
        # Gluon conv applies (ops.conv_epilogue_op), its epilogue adds them instead and writes the next
        # GroupNorm's statistics: conv1's (no time embedding: the VAE) and conv2's (once the shortcut exists).
        # A K-split conv1 (the UNet's 16² / 8²) hands norm2 its partials instead (ops.conv_norm_silu_op).
        x, h, shortcut = self._norm1(x, shortcut_bias=False)
        groups = self.norm1.num_groups if hand_over else None
        h1 = None
        if temb is None:
            h1 = ops.conv_epilogue_op(h, self.conv1, self.conv1.bias, None, self.norm2.num_groups)
        if h1 is not None:
            h, h1 = h1, None  # (norm1's output is freed here)
            h = self.norm2(h, silu=True, inplace=True)
        else:
            add = self.conv1.bias
            if isinstance(temb, TimeAdds):
                add = temb[self]
            elif self.time_emb_proj is not None and temb is not None:
                add = self.time_emb_proj(F.silu(temb)) + add  # [B, C]
            h1 = ops.conv_norm_silu_op(h, self.conv1, self.norm2, add)  # a K-split conv1: norm2 reads its partials
            if h1 is not None:
                h, h1 = h1, None
            else:
                h = self.conv1(h, with_bias=False)
                h = self.norm2(h, silu=True, add=add, inplace=True)
        bias = self._closing_bias()
        if shortcut is not None or self.conv_shortcut is None:  # (never a new live tensor before conv2)
            y = ops.conv_epilogue_op(h, self.conv2, bias, shortcut if shortcut is not None else x, groups)
            if y is not None:
                return y
        h = self.conv2(h, with_bias=False)
        if self.conv_shortcut is not None:
            if shortcut is None:
                shortcut = self.conv_shortcut(x, with_bias=False)
        else:
            shortcut = x
        return ops.bias_add_op(h, bias, residual=shortcut, inplace=True, next_groups=groups)

    def _closing_bias(self) -> torch.Tensor | None:
        """The closing add's [C] bias: conv2's, plus the shortcut conv's when there is one. That sum is
        derived once and kept while both parameters are unchanged (else a kernel launch a block a step)."""
        b2 = self.conv2.bias
        bs = self.conv_shortcut.bias if self.conv_shortcut is not None else None
        if b2 is None or bs is None:
            return bs if b2 is None else b2
        return derived(self._closing, [b2, bs], lambda: b2 + bs)


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

    def forward(
        self, x: torch.Tensor, size: tuple[int, int] | None = None, next_groups: int | None = None
    ) -> torch.Tensor:
        """``next_groups``: the output's next reader is GroupNorm(next_groups) (ops.upsample_conv_op)."""
        if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
            return ops.upsample_conv_op(x, self.conv, next_groups)
        x = F.interpolate(x, size=size, mode="nearest")  # odd latent sizes: the skip connection's size
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
        self.is_cross = context_dim is not None
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _fused_qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[3·inner, C] weight (and bias) for one GEMM, holding no second copy of the projections
        (to_q/to_k/to_v's parameters become views of it: see :func:`fused_rows`)."""
        ps = [self.to_q, self.to_k, self.to_v]
        w_old, b_old = self._qkv if self._qkv is not None else (None, None)
        w = fused_rows([p.weight for p in ps], w_old)
        b = fused_rows([p.bias for p in ps], b_old) if self.to_q.bias is not None else None
        self._qkv = (w, b)
        return w, b

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, out_bias: bool = True) -> torch.Tensor:
        """``out_bias=False`` leaves to_out's bias to the caller (token form only; it fuses it)."""
        residual = x
        if self.group_norm is not None:
            b, c, h, w = x.shape
            x = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        B, N, _ = x.shape
        if context is None and ops.current().fused_qkv:
            wqkv, bqkv = self._fused_qkv_weight()
            q, k, v = ops.linear_op(x, wqkv, bqkv).chunk(3, dim=-1)
        elif isinstance(context, CrossKV):  # K and V already projected (one GEMM for every layer)
            q, (k, v) = ops.linear_op(x, self.to_q.weight, self.to_q.bias), context[self]
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        # [B, N, H·D] -> [B, H, N, D]
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        out = ops.attention_op(q, k, v, upcast=self.upcast)
        out = out.transpose(1, 2).flatten(2)  # [B, H, N, D] -> [B, N, H·D]
        fused = ops.current().fused_epilogues
        proj = self.to_out[0]
        bias = proj.bias if out_bias and not (fused and self.group_norm is not None) else None
        out = ops.linear_op(out, proj.weight, bias)  # [B, N, H·D] -> [B, N, C]
        if self.group_norm is not None:
            out = out.transpose(1, 2).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
            if fused:
                return ops.bias_add_op(
                    out, proj.bias, residual=residual, inplace=True, next_groups=self.group_norm.num_groups
                )
            return out + residual
        return out


def qkv_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys of every self-attention's Q, K, V projections (weights; biases when present):
    the rows :meth:`Attention._fused_qkv_weight` fuses, for :mod:`speedsd.arena` to lay out adjacently."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, Attention) and not m.is_cross:
            groups.append([f"{name}.to_{x}.weight" for x in "qkv"])
            if m.to_q.bias is not None:
                groups.append([f"{name}.to_{x}.bias" for x in "qkv"])
    return groups


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` to 2x the hidden width, value·GELU(gate), ``net.2`` back."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        hidden = dim * mult
        self.net = nn.ModuleList([_GEGLU(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor, accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
        """``accumulate_into`` (x's shape; the residual with net.2's bias already added): the last GEMM
        adds its product onto it in place (cuBLAS beta = 1) and returns it, so net.2's bias and the
        residual cost no pass of their own."""
        proj, out = self.net[0].proj, self.net[2]
        h = ops.feed_forward_geglu_op(x, proj.weight, proj.bias)
        if accumulate_into is None:
            return F.linear(h, out.weight, out.bias)
        return ops.linear_accumulate_op(accumulate_into, h, out.weight)  # in place: r += h @ Wᵀ


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
