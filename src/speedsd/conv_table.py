"""Per-card, per-shape choice between cuDNN, the implicit-GEMM Triton conv and the Gluon 3x3 conv
(``Flags.igemm_conv``).

Measured, not guessed: ``python -m speedsd.bench.kernels_conv --table src/speedsd/data/conv_table.json``
times every candidate launch shape of :func:`speedsd.kernels.conv_igemm.conv2d_igemm` on the SD convs
that cuDNN runs below the card's rate, and on sm_90 cards the variants of
:func:`speedsd.kernels.conv_gluon.conv3x3_gluon` on the VAE decoder's big 3x3 convs (``--shapes vae``) and its
tiles x K splits on the UNet's 32², 16² and 8² 3x3 convs (``--shapes unet``), against cuDNN, in
CUDA-graph replay, and records per card the winner ("best": "cudnn", "igemm" or "gluon") and its config
(``config``: the winner's, or the best implicit-GEMM one where cuDNN won). A card or shape not in the
table runs cuDNN. Where the winner is a Gluon K split, its partial sum may also add a ResNet block's
residual (:func:`split_residual_config`) or be left to the next GroupNorm (:func:`split_config`, ops).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from speedsd.attention_table import write_card_table
from speedsd.kernels.add_gn_stats import handover_plan
from speedsd.kernels.conv_gluon import GluonConvConfig
from speedsd.kernels.conv_igemm import IgemmConfig

TABLE_PATH = Path(__file__).parent / "data" / "conv_table.json"
# what an entry's "best" may name, and how its "config" string parses for the Triton/Gluon kernels
CHOICES = ("cudnn", "igemm", "gluon")
_PARSE = {"igemm": IgemmConfig.parse, "gluon": GluonConvConfig.parse}


def shape_key(x_shape: tuple[int, ...], n: int, kernel: int, stride: int, padding: int, dtype: torch.dtype) -> str:
    b, c, h, w = x_shape
    return f"{b}x{c}x{h}x{w}->{n} k{kernel} s{stride} p{padding} {str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=8)
def _table(card: str, path: str) -> dict[str, IgemmConfig | GluonConvConfig]:
    p = Path(path)
    if not p.exists():
        return {}
    entries = json.loads(p.read_text()).get("cards", {}).get(card, {})
    out: dict[str, IgemmConfig | GluonConvConfig] = {}
    for key, e in entries.items():
        if e.get("best") not in CHOICES:
            raise ValueError(f"{path}: {card} / {key}: unknown conv choice {e.get('best')!r}")
        if e["best"] in _PARSE:
            out[key] = _PARSE[e["best"]](e["config"])
    return out


# Which epilogue kind a conv's output needs: "stats" (bias + the next GroupNorm's statistics) or "residual"
# (bias + residual, with or without them). Per card and shape, an entry's "epilogue" maps a kind to the Gluon
# config measured faster than the engine's unfused conv + pass (python -m speedsd.bench.conv_epilogue --table).
EPILOGUE_KINDS = ("stats", "residual")


@functools.lru_cache(maxsize=8)
def _epilogue_table(card: str, path: str) -> dict[tuple[str, str], GluonConvConfig]:
    p = Path(path)
    if not p.exists():
        return {}
    out = {}
    for key, e in json.loads(p.read_text()).get("cards", {}).get(card, {}).items():
        for kind, cfg in e.get("epilogue", {}).items():
            if kind not in EPILOGUE_KINDS:
                raise ValueError(f"{path}: {card} / {key}: unknown epilogue kind {kind!r}")
            if cfg is not None:
                out[(key, kind)] = GluonConvConfig.parse(cfg)
    return out


@functools.lru_cache(maxsize=16)
def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choose(
    x_shape: tuple[int, ...], n: int, kernel: int, stride: int, padding: int, dtype: torch.dtype, device: torch.device
) -> IgemmConfig | GluonConvConfig | None:
    """The measured config when the implicit-GEMM (IgemmConfig) or the Gluon conv (GluonConvConfig) beat
    cuDNN on this device's card and shape, else None."""
    return _table(card_name(device), str(TABLE_PATH)).get(shape_key(x_shape, n, kernel, stride, padding, dtype))


def epilogue_config(
    x_shape: tuple[int, ...], n: int, kind: str, dtype: torch.dtype, device: torch.device
) -> GluonConvConfig | None:
    """The Gluon config measured on this card to beat the unfused conv + pass for a 3x3 stride-1 pad-1 conv of
    this shape with an epilogue of this kind (EPILOGUE_KINDS), else None (ops.conv_epilogue_op)."""
    key = shape_key(x_shape, n, 3, 1, 1, dtype)
    return _epilogue_table(card_name(device), str(TABLE_PATH)).get((key, kind))


def subpixel_config(
    x_shape: tuple[int, ...], co: int, dtype: torch.dtype, device: torch.device
) -> GluonConvConfig | None:
    """For an upsampler (nearest 2x, then a 3x3 conv to ``co`` channels) of input x_shape: the Gluon config of its
    sub-pixel form as one launch (kernels/conv_gluon.subpixel_conv_gluon) where this card's table measured it
    faster than the cuDNN phase conv + interleave. The entry's key is that phase conv's, the 2x2 conv of the folded
    weight into 4·co channels (python -m speedsd.bench.subpixel_gluon --table). None elsewhere."""
    cfg = choose(x_shape, 4 * co, 2, 1, 1, dtype, device)
    return cfg if isinstance(cfg, GluonConvConfig) else None


def split_config(
    x_shape: tuple[int, ...], conv: torch.nn.Conv2d, dtype: torch.dtype, device: torch.device
) -> GluonConvConfig | None:
    """The table's config for a 3x3 stride-1 pad-1 ``conv`` of this input where it is a Gluon K split, else None."""
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
        return None
    cfg = choose(x_shape, conv.out_channels, 3, 1, 1, dtype, device)
    return cfg if isinstance(cfg, GluonConvConfig) and cfg.split > 1 else None


def split_residual_config(
    x_shape: tuple[int, ...], conv: torch.nn.Conv2d, groups: int | None, dtype: torch.dtype, device: torch.device
) -> GluonConvConfig | None:
    """For a 3x3 stride-1 pad-1 ``conv`` whose output gets a bias and a residual added: the plain conv's table
    config where it is a Gluon K split and the output hands no GroupNorm(groups) statistics over (no such
    reader, or a GroupNorm plan that takes its own in one launch). The split's second kernel, the partial sum,
    then adds bias and residual, so the closing bias/residual pass is not launched. None elsewhere."""
    cfg = split_config(x_shape, conv, dtype, device)
    if cfg is None:
        return None
    n, co, s = x_shape[0], conv.out_channels, x_shape[2] * x_shape[3]
    if groups and co % groups == 0 and handover_plan(n, co, s, groups, True, dtype.itemsize, device) is not None:
        return None  # the closing pass would hand statistics over (kernels/add_gn_stats.py)
    return cfg


def merge_into(path: Path, card: str, table: dict, keep: bool = False) -> None:
    """Record one card's measured conv table (other cards' entries are kept). ``keep``: update this card's
    entries with ``table`` (a run over a subset of the shapes) instead of replacing them."""
    if keep and path.exists():
        table = {**json.loads(path.read_text()).get("cards", {}).get(card, {}), **table}
    write_card_table(path, card, table)
    _table.cache_clear()
    _epilogue_table.cache_clear()


def record_epilogues(path: Path, card: str, choices: dict[str, dict]) -> None:
    """Set each shape entry's measured "epilogue" choices ({kind: config string or None}) and timings, keeping the
    entry's other fields (a shape without an entry gets one naming cuDNN for the plain conv)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    entries = dict(data.get("cards", {}).get(card, {}))
    for key, fields in choices.items():
        entries[key] = {**entries.get(key, {"best": "cudnn"}), **fields}
    write_card_table(path, card, entries)
    _table.cache_clear()
    _epilogue_table.cache_clear()
