"""Which implementation each op runs: the :class:`Flags` value that :mod:`speedsd.ops` dispatches on, its named
presets, and the current flags (a module-level value the models' calls read; :func:`using` scopes it).

    with using(Flags(group_norm=True, attention="flash")):
        eps = unet(latents, t, text)

:mod:`speedsd.ops` re-exports every name here (``ops.Flags``, ``ops.using``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

ATTENTION_MODES = ("math", "sdpa", "partial", "flash", "gluon", "cross", "auto")


@dataclass(frozen=True)
class Flags:
    """Which optimized implementation each op uses. All off = the paper-style baseline."""

    group_norm: bool = False  # fused Triton GroupNorm (+SiLU) in one launch
    gelu: bool = False  # fused Triton GELU / GEGLU feed-forward
    # math (materialized softmax) | sdpa | partial | flash | auto | gluon (the Hopper d=40/80/160 fused-QKV
    # self-attention kernel where it applies, SDPA elsewhere) | cross (the one-pass kernel for <= 128 keys
    # where it applies, flash elsewhere)
    attention: str = "math"
    winograd: bool = False  # Winograd 3x3 conv where the per-layer table picks it
    channels_last: bool = False  # NHWC activations end to end
    fused_qkv: bool = False  # one GEMM for the self-attention Q, K, V projections
    # conv/linear biases, the time embedding and residual adds folded into the neighbouring kernels
    # (GroupNorm pre-add, one bias+residual pass, add+LayerNorm), 1x1 convs as GEMMs with the bias in
    # the epilogue, Triton LayerNorm and nearest-2x upsampling
    fused_epilogues: bool = False
    # nearest-2x upsampling + 3x3 conv as four 2x2 "phase" convs on the small input (4/9 of the FLOPs,
    # no upsampled tensor) and one Triton interleave, on inputs of >= ops.SUBPIXEL_MIN_PIXELS pixels (with
    # igemm_conv, one Gluon launch storing the phases interleaved where the per-card conv table names one)
    subpixel_upsample: bool = False
    # convs cuDNN runs far below the card's rate as Triton kernels: the UNet's 8x8 convs as an implicit
    # GEMM (split-K where the output is one tile) where the per-card table measured it faster, and the
    # output heads' 3x3 convs to <= 8 channels as the narrow conv (with group_norm: GroupNorm+SiLU folded
    # into its prologue)
    igemm_conv: bool = False
    # the UNet's linears with the cuBLASLt algorithm the per-card GEMM table measured fastest (gemm_table.py;
    # torch's first heuristic choice elsewhere)
    gemm_algos: bool = False
    cuda_graphs: bool = False  # UNet step / VAE decode replayed from captured CUDA graphs

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")

    def replace(self, **changes: object) -> Flags:
        return dataclasses.replace(self, **changes)


# Named presets. "baseline" is the paper's starting point; "reference" is the plain-torch engine as a
# user would write it (SDPA attention); "fast" is the fastest correct set measured on the H200 and H100
# (per-card tables pick the attention kernel and the implicit-GEMM convs shape by shape). It leaves
# Winograd off: the per-layer table's two winning layers changed the image time by < 0.05 ms
# end to end (bench/results/e2e.md) while their transformed filters held 146 MiB of extra memory.
PRESETS: dict[str, Flags] = {
    "baseline": Flags(),
    "reference": Flags(attention="sdpa"),
    "fast": Flags(
        group_norm=True,
        gelu=True,
        attention="auto",
        winograd=False,
        channels_last=True,
        fused_qkv=True,
        fused_epilogues=True,
        subpixel_upsample=True,
        igemm_conv=True,
        gemm_algos=True,
        cuda_graphs=True,
    ),
}


def default_flags(device: torch.device | str) -> Flags:
    """The fastest correct set for a device: every kernel on CUDA, plain torch elsewhere."""
    return PRESETS["fast"] if torch.device(device).type == "cuda" else PRESETS["reference"]


_current: Flags = PRESETS["baseline"]


def current() -> Flags:
    return _current


def set_flags(flags: Flags) -> None:
    global _current
    _current = flags


@contextlib.contextmanager
def using(flags: Flags) -> Iterator[Flags]:
    """Run the enclosed model calls with ``flags``; restores the previous flags on exit."""
    prev = current()
    set_flags(flags)
    try:
        yield flags
    finally:
        set_flags(prev)
