"""The one dispatch point between the models and the kernels.

Every op that an optimized kernel can replace (GroupNorm(+SiLU), GELU/GEGLU, attention, 3x3 conv,
LayerNorm, and the linears, whose cuBLASLt algorithm a per-card table may pick) is called by the models through
this module. Which implementation runs is decided here,
and only here, from an explicit :class:`Flags` value, so each optimization can be switched on and off
on its own: the paper's ablation is a list of ``Flags``, not a fork of the model code.

    with ops.using(Flags(group_norm=True, attention="flash")):
        eps = unet(latents, t, text)

The flags themselves, their presets and the current value live in :mod:`speedsd.flags` (re-exported here).

A flag that asks for a Triton kernel on a tensor the kernel cannot run on (a CPU tensor without
``TRITON_INTERPRET=1``) raises instead of silently running the reference: an ablation row must
measure what it says it measures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from speedsd import conv_table, cublaslt, gemm_table
from speedsd.flags import ATTENTION_MODES, PRESETS, Flags, current, default_flags, set_flags, using
from speedsd.kernels.add_gn_stats import add_with_group_norm_stats
from speedsd.kernels.attention_gluon import attention_gluon
from speedsd.kernels.bias_add import bias_add, bias_add_ref
from speedsd.kernels.conv_gluon import (
    GluonConvConfig,
    conv3x3_gluon,
    conv3x3_gluon_partials,
    conv_gluon_epilogue_problem,
    conv_gluon_supported,
)
from speedsd.kernels.conv_igemm import conv2d_igemm, tma_problem
from speedsd.kernels.cross_attention import cross_attention
from speedsd.kernels.flash_attention import MAX_FLASH_HEAD_DIM, flash_attention
from speedsd.kernels.geglu import feed_forward_geglu, feed_forward_geglu_ref, gelu, gelu_ref
from speedsd.kernels.group_norm import group_norm, group_norm_ref
from speedsd.kernels.group_norm_affine import group_norm_scale_shift
from speedsd.kernels.group_norm_partials import group_norm_partials, partials_plan
from speedsd.kernels.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from speedsd.kernels.narrow_conv import MAX_CO, conv3x3_narrow
from speedsd.kernels.softmax_attention import attention_partial_softmax, attention_ref
from speedsd.kernels.subpixel_conv import FLOATS as INTERLEAVE_DTYPES
from speedsd.kernels.subpixel_conv import phase_interleave_ref, subpixel_upsample_conv
from speedsd.kernels.subpixel_conv_gluon import subpixel_conv_gluon, subpixel_conv_gluon_supported
from speedsd.kernels.subpixel_weight import subpixel_weight, subpixel_weight_ref
from speedsd.kernels.upsample import upsample_nearest2x, upsample_nearest2x_ref
from speedsd.kernels.winograd import winograd_conv3x3_module

# the flags live in speedsd.flags; the models and tests reach them as ops.Flags, ops.using, ...
__all__ = ["ATTENTION_MODES", "PRESETS", "Flags", "current", "default_flags", "set_flags", "using"]


def _triton_runs(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``x``: a CUDA tensor, or any under the interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_ok(x: torch.Tensor, what: str) -> bool:
    if _triton_runs(x):
        return True
    raise RuntimeError(
        f"the {what} kernel was asked for on a {x.device.type} tensor; Triton kernels need CUDA "
        "(or TRITON_INTERPRET=1 for tests). Use the 'reference' flags on this device."
    )


# ---- ops ---------------------------------------------------------------------------------------


def group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
    add: torch.Tensor | None = None,
    inplace: bool = False,
    concat: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm(x + add) over [N, C, *spatial] with an optional SiLU fused after the affine.

    ``add``: None, or a [C] / [N, C] vector broadcast over the spatial dims (a conv bias plus the time
    embedding), added inside the kernel so x + add is never written.
    ``inplace``: x is dead after this call, so the kernel may write the result over it (every kernel
    path reads a value before writing it; kernels/group_norm.py). The reference path and non-dense x
    return a new tensor: callers rebind (``h = norm(h, inplace=True)``) so x is freed either way.
    ``concat``: normalise cat([x, concat], dim=1) instead; the kernel reads both and never forms it (the
    reference path does); the output is new (``inplace`` does not apply).
    """
    if current().group_norm and _kernel_ok(x, "group_norm"):
        out = x if inplace and _dense(x) and concat is None else None
        return group_norm(x, num_groups, weight, bias, eps, silu=silu, add=add, out=out, concat=concat)
    if concat is not None:
        x = torch.cat([x, concat], dim=1)  # [N, C1, ...] ++ [N, C2, ...] -> [N, C1 + C2, ...]
    return group_norm_ref(x, num_groups, weight, bias, eps, silu=silu, add=add)


def _dense(x: torch.Tensor) -> bool:
    """NCHW-contiguous or channels_last: a layout the kernels read directly (no copy)."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, x_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """LayerNorm over the last dim (Triton with ``fused_epilogues``), of x + x_bias when given."""
    if current().fused_epilogues and _kernel_ok(x, "layer_norm"):
        return layer_norm(x, weight, bias, eps, x_bias=x_bias)
    return layer_norm_ref(x, weight, bias, eps, x_bias=x_bias)


def add_layer_norm_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    delta_bias: torch.Tensor | None = None,
    s_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s)) with s = x (+ x_bias) + delta (+ delta_bias): a residual add and the next norm in
    one pass. ``s_bias``: added to the returned s only (the bias of a GEMM that will accumulate into s)."""
    biases = dict(delta_bias=delta_bias, s_bias=s_bias, x_bias=x_bias)
    if current().fused_epilogues and _kernel_ok(x, "add_layer_norm"):
        return add_layer_norm(x, delta, weight, bias, eps, **biases)
    return add_layer_norm_ref(x, delta, weight, bias, eps, **biases)


def bias_add_op(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    inplace: bool = False,
    next_groups: int | None = None,
) -> torch.Tensor:
    """x + bias[c] (+ residual); c is dim 1 of a 4-D x, the last dim otherwise. ``inplace`` writes into x.

    ``next_groups``: the output's next reader is a GroupNorm with that many groups; with the GroupNorm
    kernel on, this pass also writes its split-path statistics (kernels/add_gn_stats.py)."""
    flags = current()
    if flags.fused_epilogues and _kernel_ok(x, "bias_add"):
        out = x if inplace else None
        if next_groups and flags.group_norm:  # (a plain bias_add for shapes without a split plan)
            return add_with_group_norm_stats(x, bias, residual, next_groups, out=out)
        return bias_add(x, bias, residual, out=out)
    return bias_add_ref(x, bias, residual)


# Measured on an H200 (bench/results/kernels_subpixel.md): the phase form is 1.5-2.4x faster at the
# VAE decoder's upsamplers (inputs 64²..256²), 1.3-1.5x at the UNet's 16² and 32² ones and 0.92x at 8².
# Its folded weights (16/9 of the 3x3 weight) are kept on the module from 64x64 inputs (18 MiB for the
# VAE at 512²). The UNet's 16² and 32² ones (62.5 MiB) only inside a loop scope (:func:`loop_scope`): folded
# once per denoising loop (or per UNet step run outside one: Pipeline._unet_forward), dropped at its end, live
# only while the UNet runs, whose activations stay far below the VAE decode's that set the pipeline's peak
# (memory_probe_trace_h200.txt: 78 vs 256 MiB).
SUBPIXEL_MIN_PIXELS = 64 * 64
SUBPIXEL_LOOP_MIN_PIXELS = 16 * 16
_loop_weights: dict[int, tuple] | None = None  # id(conv) -> (conv, key, folded weight) inside a loop scope


@contextlib.contextmanager
def loop_scope(inner: bool = False) -> Iterator[None]:
    """Weights derived for a loop (the folded upsampler weights above) are kept until this block ends.
    ``inner``: inside an enclosing scope, use that one (its folds serve this block too)."""
    global _loop_weights
    if inner and _loop_weights is not None:
        yield
        return
    prev, _loop_weights = _loop_weights, {}
    try:
        yield
    finally:
        _loop_weights = prev


def upsample_conv_op(x: torch.Tensor, conv: torch.nn.Conv2d, next_groups: int | None = None) -> torch.Tensor:
    """``conv`` (3x3, stride 1, pad 1) of the nearest-2x upsampled [N, C, H, W] input. ``next_groups``: the
    output's next reader is GroupNorm(next_groups): with the GroupNorm kernel on, the sub-pixel interleave also
    writes its statistics (kernels/gn_tile_stats.py)."""
    flags = current()
    pixels = x.shape[2] * x.shape[3]
    scoped = _loop_weights is not None and pixels >= SUBPIXEL_LOOP_MIN_PIXELS
    if (
        flags.subpixel_upsample
        and (pixels >= SUBPIXEL_MIN_PIXELS or scoped)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
    ):
        w4 = _subpixel_weight_for(conv, x.dtype, keep=pixels >= SUBPIXEL_MIN_PIXELS)
        groups = next_groups if flags.group_norm else None
        # one Gluon launch (phase convs stored interleaved, bias added, a GroupNorm reader's statistics written)
        # where the card's table measured it faster than cuDNN's phase conv + the interleave
        cfg = None
        if flags.igemm_conv:
            cfg = conv_table.subpixel_config(tuple(x.shape), conv.out_channels, x.dtype, x.device)
        if cfg is not None and subpixel_conv_gluon_supported(x, w4, conv.bias, cfg, groups):
            return subpixel_conv_gluon(x, w4, conv.bias, cfg, stats_groups=groups)
        if _triton_runs(x) and x.dtype in INTERLEAVE_DTYPES:  # the Triton interleave's dtypes (not fp64)
            return subpixel_upsample_conv(x, w4, conv.bias, stats_groups=groups)
        return subpixel_upsample_conv(x, w4, conv.bias, interleave=phase_interleave_ref)  # torch's interleave
    return conv2d_op(upsample_nearest2x_op(x), conv)


def _subpixel_weight_for(conv: torch.nn.Conv2d, dtype: torch.dtype, keep: bool = True) -> torch.Tensor:
    """The folded [4·Co, Ci, 2, 2] weight, cached on the module (``keep``) or in the loop scope; re-folded
    when the weight changes (in-place updates bump ``_version``) or moves. One Triton launch where Triton
    runs (no fp32 temporaries of the whole weight inside a denoising loop), else torch."""
    w = conv.weight
    key = (w._version, w.data_ptr(), w.device, dtype, w.is_contiguous(memory_format=torch.channels_last))
    cached = getattr(conv, "_speedsd_subpixel", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    fold = subpixel_weight if _triton_runs(w) and dtype != torch.float64 else subpixel_weight_ref
    if not keep and _loop_weights is not None:
        scoped = _loop_weights.get(id(conv))
        if scoped is None or scoped[1] != key:
            with torch.no_grad():
                scoped = _loop_weights[id(conv)] = (conv, key, fold(w.detach().to(dtype)))
        return scoped[2]
    with torch.inference_mode(False), torch.no_grad():
        conv._speedsd_subpixel = (key, fold(w.detach().to(dtype)))
    return conv._speedsd_subpixel[1]


def upsample_nearest2x_op(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of [N, C, H, W] (Triton with ``fused_epilogues``)."""
    if current().fused_epilogues and _kernel_ok(x, "upsample"):
        return upsample_nearest2x(x)
    return upsample_nearest2x_ref(x)


def gelu_op(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU; ``approximate`` is "none" (erf), "tanh" or "quick" (x·sigmoid(1.702x), CLIP ViT-L)."""
    if current().gelu and approximate != "quick" and _kernel_ok(x, "gelu"):
        return gelu(x, approximate)
    return gelu_ref(x, approximate)


def feed_forward_geglu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """SD's GEGLU projection: (v, g) = split(x @ Wᵀ + b); v · GELU(g). weight is [2F, K]."""
    if current().gelu and _kernel_ok(x, "geglu"):
        return feed_forward_geglu(x, weight, bias, approximate)
    return feed_forward_geglu_ref(x, weight, bias, approximate)


def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, upcast: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    ``upcast`` computes the scores in fp32 (SD 2.x's upcast_attention); the Triton kernels always
    accumulate in fp32, so it only changes the reference paths. "gluon" runs the Gluon kernel where it
    applies (fp16 fused-QKV d=40/80 self-attention on sm_90, kernels/attention_gluon.py) and SDPA elsewhere;
    "cross" the one-pass kernel for short contexts (Nk <= 128, kernels/cross_attention.py), flash elsewhere.
    """
    mode = current().attention
    if mode == "auto":
        mode = pick_attention(q, k, upcast)
    if mode == "gluon":
        out = attention_gluon(q, k, v, scale=scale)
        if out is not None:
            return out
        mode = "sdpa"
    if mode == "math":
        return attention_ref(q, k, v, scale=scale, upcast=upcast)
    if mode == "sdpa":
        if upcast and q.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if mode == "partial" and _kernel_ok(q, "partial-softmax attention"):
        return attention_partial_softmax(q, k, v, scale=scale)
    if mode == "flash" and _kernel_ok(q, "flash attention"):
        return flash_attention(q, k, v, scale=scale)
    if mode == "cross" and _kernel_ok(q, "cross attention"):
        return cross_attention(q, k, v, scale=scale)  # flash_attention where cross_attention_supported is False
    raise AssertionError(mode)


def pick_attention(q: torch.Tensor, k: torch.Tensor, upcast: bool = False) -> str:
    """Attention implementation for 'auto': measured per shape (see speedsd.bench.kernels), then
    :func:`upcast_choice`."""
    if not q.is_cuda:
        return "sdpa"
    from speedsd.attention_table import choose

    return upcast_choice(choose(q.shape, k.shape, q.dtype), q.dtype, q.shape[-1], upcast)


def upcast_choice(best: str, dtype: torch.dtype, head_dim: int, upcast: bool) -> str:
    """The table's choice for an ``upcast`` model (SD 2.1-v): its "sdpa" was timed in fp16, but upcast runs
    SDPA in fp32, several times slower; the flash kernel computes the scores and softmax in fp32 from the
    fp16/bf16 inputs, which is what upcast asks for, at fp16 speed. Other choices (our kernels) are kept."""
    if best == "sdpa" and upcast and dtype in (torch.float16, torch.bfloat16) and head_dim <= MAX_FLASH_HEAD_DIM:
        return "flash"
    return best


def _igemm_conv(x: torch.Tensor, conv: torch.nn.Conv2d, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The implicit-GEMM Triton conv or the Gluon 3x3 conv where the per-card table measured it faster than
    cuDNN, else None (also for a Gluon or TMA entry its kernel cannot take here, e.g. not channels_last)."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size != (k, k) or conv.stride != (s, s):
        return None
    if not isinstance(p, tuple) or p != (p[0], p[0]) or x.dim() != 4:
        return None
    cfg = conv_table.choose(tuple(x.shape), conv.out_channels, k, s, p[0], x.dtype, x.device)
    if isinstance(cfg, GluonConvConfig):
        return conv3x3_gluon(x, conv.weight, bias, cfg) if conv_gluon_supported(x, conv, bias, cfg) else None
    if cfg is None or (cfg.tma and tma_problem(x, conv.weight, s, p[0], cfg) is not None):
        return None  # (a TMA config needs channels_last operands)
    return conv2d_igemm(x, conv.weight, bias, s, p[0], cfg)


def conv_epilogue_op(
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    next_groups: int | None = None,
) -> torch.Tensor | None:
    """conv(x) + bias (+ residual) as one Gluon 3x3 conv whose epilogue adds them and, with ``next_groups``
    (the output's next reader is that GroupNorm) and the GroupNorm kernel on, writes its tile statistics
    (kernels/gn_tile_stats.py): the output is then written once and not re-read before it is normalised.
    With ``igemm_conv`` and ``fused_epilogues``, where the conv table measured this kind of epilogue on this
    card and shape faster than the unfused conv + pass (conv_table.epilogue_config), or, for a residual, where
    the plain conv is a Gluon K split that hands no statistics over (conv_table.split_residual_config). None
    elsewhere: the caller runs conv2d_op and its own bias/residual pass."""
    flags = current()
    if not (flags.igemm_conv and flags.fused_epilogues and _triton_runs(x) and x.dim() == 4):
        return None
    groups = next_groups if flags.group_norm else None
    kind = "residual" if residual is not None else "stats"
    if kind == "stats" and not groups:
        return None  # a bias alone: conv2d_op's own bias handling
    cfg = conv_table.epilogue_config(tuple(x.shape), conv.out_channels, kind, x.dtype, x.device)
    if cfg is None and kind == "residual":  # a K-split conv's partial sum adds bias and residual (no statistics)
        cfg = conv_table.split_residual_config(tuple(x.shape), conv, groups, x.dtype, x.device)
        groups = None
    if cfg is None or not conv_gluon_supported(x, conv, bias, cfg):
        return None
    if conv_gluon_epilogue_problem(x, conv.weight, residual, groups, cfg) is not None:
        return None
    return conv3x3_gluon(x, conv.weight, bias, cfg, residual=residual, stats_groups=groups)


def conv_norm_silu_op(
    x: torch.Tensor, conv: torch.nn.Conv2d, norm: torch.nn.GroupNorm, add: torch.Tensor | None
) -> torch.Tensor | None:
    """SiLU(norm(conv(x) + add)), ``conv`` without its bias (``add`` carries it), normalised straight from a
    K-split Gluon conv's fp32 partials (kernels/group_norm_partials.py: the sum is never written) where the conv
    table names such a split for this shape and GroupNorm runs the output in one launch. None elsewhere (the
    caller runs the conv, then GroupNorm)."""
    flags = current()
    if not (flags.igemm_conv and flags.fused_epilogues and flags.group_norm and _triton_runs(x) and x.dim() == 4):
        return None
    cfg = conv_table.split_config(tuple(x.shape), conv, x.dtype, x.device)
    if cfg is None or not conv_gluon_supported(x, conv, None, cfg):
        return None
    n, co, h, w = x.shape[0], conv.out_channels, x.shape[2], x.shape[3]
    if partials_plan(n, co, h * w, norm.num_groups, x.dtype, x.device, cfg.split) is None:
        return None
    parts = conv3x3_gluon_partials(x, conv.weight, cfg)
    gn = (norm.num_groups, norm.weight, norm.bias, norm.eps)
    return group_norm_partials(parts, (n, co, h, w), *gn, silu=True, add=add, dtype=x.dtype)


def norm_silu_conv_op(
    x: torch.Tensor, norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, inplace: bool = False
) -> torch.Tensor:
    """conv(silu(norm(x))): a model's output head. With ``igemm_conv``, a 3x3 stride-1 conv to <= 8
    channels runs as the narrow Triton conv (x read once, the nine taps in one GEMM); with ``group_norm``
    too, GroupNorm is folded into its prologue as a per-(sample, channel) affine (x·scale + shift, from the
    split path's statistics), so the normalised tensor is never written. ``inplace``: x is dead after
    this call (group_norm_op's, where GroupNorm runs on its own)."""
    flags = current()
    gn = (norm.num_groups, norm.weight, norm.bias, norm.eps)
    if flags.igemm_conv and _triton_runs(x) and _narrow_ok(x, conv):
        folded = group_norm_scale_shift(x, *gn) if flags.group_norm else None
        if folded is not None:
            return conv3x3_narrow(x, conv.weight, conv.bias, scale=folded[0], shift=folded[1], silu=True)
        return conv3x3_narrow(group_norm_op(x, *gn, silu=True, inplace=inplace), conv.weight, conv.bias)
    return conv2d_op(group_norm_op(x, *gn, silu=True, inplace=inplace), conv)


def _narrow_ok(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    return (
        geometry == ((3, 3), (1, 1), (1, 1), (1, 1), 1)
        and conv.out_channels <= MAX_CO
        and x.dim() == 4
        and x.dtype == conv.weight.dtype
    )


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


_seen_linears: set | None = None  # speedsd.bench.gemm_algos collects the problems here while it records a step


def _lt_plan(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None
) -> cublaslt.Plan | None:
    """With ``gemm_algos``, the cuBLASLt plan of the algorithm the card's GEMM table names for this linear."""
    if not current().gemm_algos or not _on_cuda(x):
        return None
    if _seen_linears is None and not gemm_table.has_entries(x.device):  # (a card without a table: torch)
        return None
    problem = cublaslt.problem_of(x, weight, bias, out)
    if problem is None:
        return None
    if _seen_linears is not None:
        _seen_linears.add(problem)
    config = gemm_table.choose(problem, x.device)
    return None if config is None else cublaslt.plan(problem, x.device.index or 0, config)


def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [..., K] -> [..., N]; with the table's cuBLASLt algorithm where it has one."""
    plan = _lt_plan(x, weight, bias, None)
    if plan is None:
        return F.linear(x, weight, bias)
    return plan.run(x, weight, bias, torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device))


def linear_accumulate_op(r: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """r += h @ Wᵀ in place (beta = 1: the residual costs no pass of its own); returns r."""
    plan = _lt_plan(h, weight, None, r)
    if plan is not None:
        return plan.run(h, weight, None, r)
    r.view(-1, r.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())  # [M, N] += [M, K] @ [K, N]
    return r


def conv2d_op(x: torch.Tensor, conv: torch.nn.Conv2d, with_bias: bool = True) -> torch.Tensor:
    """A conv layer's forward; ``with_bias=False`` leaves conv.bias to the caller (who fuses it).

    3x3 stride-1 pad-1 layers may run as Winograd per the layer table; with ``igemm_conv``, the convs
    the per-card conv table names run as the Triton implicit GEMM. With ``fused_epilogues``, 1x1
    convs on channels_last input run as one GEMM over the pixels with the bias in its epilogue, and
    other convs add their bias with one vectorised pass instead of torch's broadcast add.
    """
    flags = current()
    bias = conv.bias if with_bias else None
    if flags.winograd and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1):
        if _triton_runs(x):
            out = winograd_conv3x3_module(x, conv, bias=with_bias)
            if out is not None:  # None: the table says cuDNN wins on this layer
                return out
    if flags.igemm_conv and _triton_runs(x):
        out = _igemm_conv(x, conv, bias)
        if out is not None:
            return out
    if not flags.fused_epilogues:
        return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding)
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = x.shape
        t = linear_op(x.permute(0, 2, 3, 1), conv.weight.flatten(1), bias)  # [N, H, W, Cin] -> [N, H, W, Cout]
        return t.permute(0, 3, 1, 2)  # [N, Cout, H, W] with channels_last strides
    out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    return bias_add_op(out, bias, inplace=True) if bias is not None else out
