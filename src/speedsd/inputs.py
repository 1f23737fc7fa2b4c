"""Checking and converting what users hand the pipeline: prompts, sizes, seeds, images, outputs.

Every check raises ValueError with a message naming the parameter; the CLI and the HTTP server call
the same functions before loading a model or taking the generation lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

OUTPUTS = ("pil", "tensor", "latent")
MAX_SEED = 2**64 - 1


def is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def prompts_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def negatives_list(negative_prompt: str | Sequence[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negs = prompts_list(negative_prompt, "negative_prompt")
    if len(negs) == 1:
        return negs * n
    if len(negs) != n:
        raise ValueError(f"got {len(negs)} negative prompts for {n} prompts; give one or one per prompt")
    return negs


def check_size(height: object, width: object, multiple: int = 8) -> None:
    for name, v in (("height", height), ("width", width)):
        if not is_int(v) or v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")


def check_common(steps: object, guidance_scale: object, num_images: object, scheduler: object, output: object) -> None:
    from speedsd.schedulers import SCHEDULERS

    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if (
        not isinstance(guidance_scale, (int, float, np.floating))
        or isinstance(guidance_scale, bool)
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def check_strength(steps: int, strength: object, name: str = "strength", steps_name: str = "steps") -> None:
    """img2img's strength: a number in (0, 1] that leaves at least one of ``steps`` denoising steps."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {strength!r}")
    if int(steps * strength) < 1:
        raise ValueError(f"{steps_name} {steps} x {name} {strength} leaves no denoising step (need at least one step)")


def check_flag(value: object, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_seed(seed: object) -> None:
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")


def to_pil(image: torch.Tensor) -> list[Any]:
    """[N, 3, H, W] in [0, 1] -> N RGB PIL images (rounded to 8 bits as diffusers does)."""
    from PIL import Image

    arr = (image.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
    return [Image.fromarray(a) for a in arr]


def fit_image(image: Any, size: tuple[int, int]) -> Any:
    """A PIL image at ``size`` (width, height): Lanczos-resized where it differs (the pipeline's img2img, the
    CLI's --size and the API's width/height all resize this one way)."""
    from PIL import Image

    return image if image.size == size else image.resize(size, resample=Image.LANCZOS)


def preprocess_image(image: Any, multiple: int = 8) -> torch.Tensor:
    """PIL image(s) or [0, 1] tensor -> [B, 3, H, W] fp32 in [-1, 1], PIL sides cut to ``multiple``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(im, Image.Image) for im in image):
        w, h = image[0].size
        w, h = w - w % multiple, h - h % multiple
        if w <= 0 or h <= 0:
            raise ValueError(f"image is too small: {image[0].size}, need at least {multiple}x{multiple}")
        arrs = []
        for im in image:
            im = fit_image(im.convert("RGB"), (w, h))
            arrs.append(np.asarray(im, dtype=np.float32) / 255.0)  # [H, W, 3]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # [B, H, W, 3] -> [B, 3, H, W]
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        check_size(x.shape[2], x.shape[3], multiple)
        x = x.float().cpu().contiguous()
    else:
        raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    return x * 2.0 - 1.0
