"""From the denoised latents to what the caller asked for: the VAE decode (whole, or tile by tile above
TILED_DECODE_ABOVE), its CUDA graph captured before the loop's, and the conversion to tensors or PIL images.
Functions of a :class:`speedsd.pipeline.Pipeline`, as :mod:`speedsd.denoise` is for the loop."""

from __future__ import annotations

from typing import Any

import torch

from speedsd.inputs import to_pil

TILED_DECODE_ABOVE = 96  # latent side above which decoding goes tile by tile when tiled_decode=None


def prepare(pipe: Any, shape: tuple[int, ...], output: str, tiled_decode: bool | None) -> None:
    """Capture the VAE decode graph before the loop's if this image's decode would capture: in their
    shared pool the loop's blocks then come out of the decode's large freed segments (captured after
    the loop, the decode's 64-128 MiB activations needed segments of their own: 392 -> 336 MiB at 512²,
    `bench/results/graph_capture_order_ab_h200.txt`)."""
    if pipe._decode_graphs is None or output == "latent" or tiled(shape, tiled_decode):
        return
    # decode_latents' input signature; the values only feed a warm-up, which the first image's eager
    # decode normally made unnecessary: no fill or layout copy launched every image
    fmt = torch.channels_last if pipe.flags.channels_last else torch.contiguous_format
    z = torch.empty(shape, device=pipe.device, dtype=pipe.dtype, memory_format=fmt)
    pipe._ensure_layout()
    pipe._decode_graphs.prepare(z)


def tiled(shape: tuple[int, ...], tiled_decode: bool | None) -> bool:
    """Whether latents of ``shape`` decode tile by tile: ``tiled_decode``, or by size when it is None."""
    return max(shape[-2:]) > TILED_DECODE_ABOVE if tiled_decode is None else tiled_decode


def finish(pipe: Any, latents: torch.Tensor, output: str, tiled_decode: bool | None) -> list[Any] | torch.Tensor:
    """Final latents -> the latents themselves ("latent"), images in [0, 1] ("tensor") or PIL images ("pil")."""
    if output == "latent":
        return latents
    image = pipe.decode_latents(latents, tiled=tiled(tuple(latents.shape), tiled_decode))
    image = (image.to(pipe.latent_dtype) / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
    if output == "tensor":
        return image
    return to_pil(image)
