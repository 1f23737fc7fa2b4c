"""The Gluon conv's sub-pixel mode (kernels/conv_gluon_kernels.py, TAPS = 4): a nearest 2x upsampler + 3x3 conv as
ONE launch of the four phases' 2x2 convs on the small input, each tile stored straight into its interleaved output
positions (kernels/subpixel_conv.py derives the phase form; there it is cuDNN's phase conv + a Triton interleave).

The launch, its checks and its statistics are conv_gluon's (one kernel, one launcher); this module is the
sub-pixel entry point. ops.upsample_conv_op takes it where the card's conv table names a Gluon config for the
phase conv (conv_table.subpixel_config; ``python -m speedsd.bench.subpixel_gluon --table`` measures it).
H200 (bench/results/subpixel_gluon_h200.md): the UNet's 2x1280x16² upsampler 54.7 vs 88.6 µs for cuDNN +
interleave, 2x640x32² 40.2 vs 82.2.
"""

from __future__ import annotations

import torch

from speedsd.kernels import conv_gluon as cg
from speedsd.kernels.bias_add import drop_gn_stats
from speedsd.kernels.gn_tile_stats import attach

__all__ = ["subpixel_conv_gluon", "subpixel_conv_gluon_supported"]


def _subpixel_problem(
    x: torch.Tensor, weight4: torch.Tensor, bias: torch.Tensor | None, cfg: cg.GluonConvConfig, groups: int | None
) -> str | None:
    why = cg._problem(x, weight4, bias, cfg, taps=4)
    return why if why is not None or groups is None else cg._stats_problem(weight4.shape[0] // 4, groups, cfg)


def subpixel_conv_gluon_supported(
    x: torch.Tensor,
    weight4: torch.Tensor,
    bias: torch.Tensor | None,
    config: cg.GluonConvConfig | str,
    stats_groups: int | None = None,
) -> bool:
    """Whether :func:`subpixel_conv_gluon` runs these arguments (it would not raise)."""
    try:
        cfg = cg.resolve(config, weight4.shape[0] // 4 if weight4.dim() == 4 else 0)
    except ValueError:
        return False
    return _subpixel_problem(x, weight4, bias, cfg, stats_groups) is None


def subpixel_conv_gluon(
    x: torch.Tensor,
    weight4: torch.Tensor,
    bias: torch.Tensor | None,
    config: cg.GluonConvConfig | str,
    out: torch.Tensor | None = None,
    stats_groups: int | None = None,
) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), W, bias, padding=1) as ONE launch: the four phases'
    2x2 convs on x (weight4 = subpixel_weight(W) [4·Co, C, 2, 2], fp16 channels_last), each tile stored
    straight into its interleaved positions of y [N, Co, 2H, 2W] (fp16 channels_last; ``out`` if given), bias
    added in fp32 (kernels/subpixel_conv.py has the derivation; this replaces its conv + interleave pair).
    x: fp16 [N, C, H, W] channels_last; config: no K split, C a multiple of its bk, Co of its width.
    ``stats_groups``: y's next reader is GroupNorm(stats_groups): the epilogue also writes its statistics, one
    part per (tile, phase, warp), handed over on y (kernels/gn_tile_stats.py; conditions as conv3x3_gluon's)."""
    cfg = cg.resolve(config, weight4.shape[0] // 4 if weight4.dim() == 4 else 0)
    why = _subpixel_problem(x, weight4, bias, cfg, stats_groups)
    if why is not None:
        raise ValueError(f"subpixel_conv_gluon: {why}")
    n, _, h, w = x.shape
    co = weight4.shape[0] // 4
    out = cg._output(out, (n, co, 2 * h, 2 * w), x)
    part = cg._stats_part(x, co, stats_groups, cfg, phases=4) if stats_groups else None
    drop_gn_stats(out)
    cg._launch(x, weight4, bias, out, cfg, part=part, taps=4)
    return out if part is None else attach(out, part, stats_groups, per_channel=cfg.bn1 > 0)
