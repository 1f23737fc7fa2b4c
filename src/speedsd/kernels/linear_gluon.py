"""The Gluon conv's 1x1 mode (kernels/conv_gluon_kernels.py, TAPS = 1) as a linear layer: y = x @ Wᵀ (+ bias)
(+ residual) over M tokens, fp16 in and out, fp32 accumulation, for Hopper (sm_90).

Why: the UNet's transformer linears are short GEMMs (K = N = 320 at 64²: 25 calls a step) that cuBLAS runs in
tiles leaving SMs idle (168 x 128 tiles: 147 CTAs on 132 SMs). The conv kernel's tiles of bn + bn1 channels cut
N = 320 into 128 + 32 column blocks, 64 x 2 = 128 units of 128 tokens: one wave. Its residual epilogue takes the
feed-forward's closing add (r + h @ Wᵀ) too.

The tokens [M, C] are the image [1, C, 1, M] (channels_last: the same memory) and W [Co, C] the 1x1 weight
[Co, C, 1, 1]; configs have 1 x TW pixel tiles (``g1x128...``). The launch and its checks are conv_gluon's.
ops.linear_op takes it where the card's conv table names a Gluon config for the linear's key
(:func:`speedsd.conv_table.linear_config`; ``python -m speedsd.bench.linear_gluon --table`` measures it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedsd.kernels import conv_gluon as cg

__all__ = ["linear_gluon", "linear_gluon_ref", "linear_gluon_supported"]


def _as_image(t: torch.Tensor, m: int, c: int) -> torch.Tensor:
    """A contiguous [..., c] tensor of m rows as the channels_last image [1, c, 1, m] (no copy)."""
    return t.reshape(m, c).view(1, 1, m, c).permute(0, 3, 1, 2)


def _linear_problem(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: cg.GluonConvConfig,
    residual: torch.Tensor | None,
) -> str | None:
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return f"expects x [..., C] and weight [Co, C], got {tuple(x.shape)}, {tuple(weight.shape)}"
    if cfg.th != 1 or cfg.tb != 1 or cfg.split > 1:
        return f"config {cfg}: a linear takes 1 x TW pixel tiles of one image and no K split"
    if not (x.is_contiguous() and weight.is_contiguous()):
        return "needs contiguous x and weight"
    if residual is not None and (residual.shape != (*x.shape[:-1], weight.shape[0]) or not residual.is_contiguous()):
        return f"residual must be a contiguous {[*x.shape[:-1], weight.shape[0]]} tensor"
    c, co = weight.shape[1], weight.shape[0]
    m = x.numel() // c if c else 0
    xi = _as_image(x, m, c)
    why = cg._problem(xi, weight.view(co, c, 1, 1), bias, cfg, taps=1)
    if why is None and residual is not None:
        why = cg.conv_gluon_epilogue_problem(xi, weight.view(co, c, 1, 1), _as_image(residual, m, co), None, cfg)
    return why


def linear_gluon_supported(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: cg.GluonConvConfig | str,
    residual: torch.Tensor | None = None,
) -> bool:
    """Whether :func:`linear_gluon` runs these arguments (it would not raise)."""
    try:
        cfg = cg.resolve(config, weight.shape[0])
    except ValueError:
        return False
    return _linear_problem(x, weight, bias, cfg, residual) is None


def linear_gluon(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: cg.GluonConvConfig | str,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) (+ residual) -> fp16 [..., Co] (a new tensor), bias and residual added in fp32
    before the one fp16 rounding. x: fp16 contiguous [..., C]; weight: fp16 contiguous [Co, C]; bias: None or [Co]
    fp16/fp32; residual: None or fp16 contiguous [..., Co]. config: 1 x TW tiles, no K split, C a multiple of its
    bk and Co of its width bn + bn1."""
    cfg = cg.resolve(config, weight.shape[0] if weight.dim() == 2 else 0)
    why = _linear_problem(x, weight, bias, cfg, residual)
    if why is not None:
        raise ValueError(f"linear_gluon: {why}")
    co, c = weight.shape
    m = x.numel() // c
    out = torch.empty((*x.shape[:-1], co), dtype=x.dtype, device=x.device)
    res = None if residual is None else _as_image(residual, m, co)
    cg._launch(_as_image(x, m, c), weight.view(co, c, 1, 1), bias, _as_image(out, m, co), cfg, res, taps=1)
    return out


def linear_gluon_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch in fp32 (fp64 stays fp64): F.linear(x, weight, bias) (+ residual)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return y if residual is None else y + residual.to(acc)
