"""The ``speedsd`` command line.

    speedsd generate "a red fox in the snow" --model path/to/sd-v1-4 --seed 42 -o fox.png
    speedsd generate "test" --model random:sd1.4 --size 64x64 --steps 4   # random weights, no download
    speedsd generate "a watercolor fox" --model path/to/sd-v1-4 --init-image fox.png --strength 0.6  # img2img
    speedsd serve --model path/to/model --port 8000
    speedsd bench ...                                                   # speedsd.bench.e2e

User mistakes (bad size, unknown scheduler, missing or corrupt checkpoint, unwritable output) end
with one line ``speedsd: error: ...`` on stderr and exit status 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

import speedsd

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


class UsageError(Exception):
    """A mistake on the command line (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage + error; we want one line
        raise UsageError(message)


def _schedulers() -> list[str]:
    from speedsd.schedulers import SCHEDULERS

    return list(SCHEDULERS)


def _presets() -> list[str]:
    from speedsd.ops import PRESETS

    return list(PRESETS)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="diffusers folder, single .safetensors/.ckpt file, or random:sd1.4 (random weights, for trying it out)",
    )
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--tokenizer", metavar="DIR", help="CLIP tokenizer folder (vocab.json + merges.txt)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, help="override the checkpoint's")
    p.add_argument("--flags", metavar="PRESET", help=f"optimization preset: {', '.join(_presets())}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="speedsd", description="Fast Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"speedsd {speedsd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="text to image", description="Generate images from a prompt.")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--negative", "-n", default="", metavar="TEXT", help="negative prompt")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", "--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="default: a random seed, recorded in the PNG")
    g.add_argument("--size", metavar="WxH", help="e.g. 512x512 or 768 (default: the model's native size)")
    g.add_argument("--scheduler", "--sampler", help=f"one of {', '.join(_schedulers())} (default: the model's)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("-o", "--output", default="out.png", help="PNG path; more images: out-1.png, out-2.png ...")
    g.add_argument("--init-image", metavar="PATH", help="img2img: repaint this image (its size, or --size)")
    g.add_argument("--strength", type=float, help="img2img: how much of the schedule repaints it, (0, 1] (default 0.8)")
    g.add_argument("--truncate-prompt", action="store_true",
                   help="read only a prompt's first 75 tokens, as diffusers does (default: longer prompts are "
                        "read in blocks of 75 tokens, up to 600, as AUTOMATIC1111 does)")  # fmt: skip
    g.add_argument("--prompt-weights", action="store_true",
                   help="read AUTOMATIC1111's emphasis: (word) x1.1, [word] /1.1, (word:1.3) (default: brackets are "
                        "plain text, as diffusers reads them)")  # fmt: skip
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="HTTP API", description="Serve POST /generate and GET /health.")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-size", type=int, default=2048, help="largest width/height a request may ask for")
    s.set_defaults(func=cmd_serve)

    sub.add_parser("bench", help="end-to-end benchmark (speedsd.bench.e2e; see `speedsd bench --help`)")
    return parser


# ---- argument checks (before the slow model load) ----------------------------------------------


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """'512x768' -> (width 512, height 768); '640' -> (640, 640); None -> (None, None)."""
    if text is None:
        return None, None
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--size must look like 512x512 or 512, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ValueError(f"--size must be positive multiples of 8, got {text!r}")
    return w, h


def parse_device(text: str | None) -> torch.device:
    if text is None:
        from speedsd.pipeline import default_device

        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {text!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r} asked for, but only {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_flags(name: str | None, device: torch.device) -> Any:
    from speedsd import ops

    if name is None:
        return None
    if name not in ops.PRESETS:
        raise ValueError(f"unknown --flags preset {name!r}; choose one of {', '.join(ops.PRESETS)}")
    flags = ops.PRESETS[name]
    if device.type != "cuda":
        kernels = flags.group_norm or flags.gelu or flags.winograd or flags.attention in ("partial", "flash")
        if flags.cuda_graphs or (kernels and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError(f"--flags {name} needs a CUDA device; use --flags reference on {device.type}")
    return flags


def output_paths(output: str, n: int) -> list[Path]:
    """out.png -> [out.png, out-1.png, ...]; checks the folder is there and writable."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file (it carries the generation parameters), got {output!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {str(folder)!r} is not writable")
    paths = [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]
    for p in paths:
        if p.is_dir():
            raise ValueError(f"output {str(p)!r} is a folder")
    return paths


def read_init_image(path: str | None, size: tuple[int | None, int | None]) -> Any:
    """--init-image as an RGB PIL image (resized to --size when given), or None."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    from speedsd.inputs import fit_image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"--init-image {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read --init-image {path!r} as an image ({type(e).__name__})") from None
    width, height = size
    if width is not None and height is not None:
        image = fit_image(image, (width, height))
    if min(image.size) < 8:
        raise ValueError(f"--init-image is too small: {image.size[0]}x{image.size[1]}, need at least 8x8")
    return image


def load_pipeline(args: argparse.Namespace) -> Any:
    from speedsd.pipeline import load

    device = parse_device(args.device)
    flags = parse_flags(args.flags, device)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer!r} is not a folder")
    dtype = DTYPES[args.dtype] if args.dtype else None
    return load(
        args.model,
        device=device,
        dtype=dtype,
        flags=flags,
        tokenizer=args.tokenizer,
        prediction_type=args.prediction_type,
    )


# ---- commands ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speedsd import inputs as pl
    from speedsd import prompts
    from speedsd.pngmeta import GenerationParams, save_png

    width, height = parse_size(args.size)
    scheduler = args.scheduler
    pl.check_common(args.steps, args.guidance, args.num_images, scheduler or "pndm", "pil")
    pl.check_seed(args.seed)
    strength = 0.8 if args.strength is None else args.strength
    if args.init_image is None and args.strength is not None:
        raise ValueError("--strength needs --init-image")
    if args.init_image is not None:
        pl.check_strength(args.steps, strength, "--strength", "--steps")
    init = read_init_image(args.init_image, (width, height))
    paths = output_paths(args.output, args.num_images)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)

    pipe = load_pipeline(args)
    how = args.truncate_prompt, args.prompt_weights
    for warning in prompts.truncation_warnings(pipe.tokenizer, args.prompt, args.negative, *how):
        print(f"speedsd: warning: {warning}", file=sys.stderr)
    scheduler = scheduler or pipe.components.default_scheduler
    bar = tqdm(desc="denoising", unit="step", file=sys.stderr, disable=None, leave=False)

    def progress(i: int, n: int, t: object, latents: object) -> None:
        bar.total = n
        bar.update(1)

    common = dict(
        negative_prompt=args.negative or None,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=seed,
        scheduler=scheduler,
        num_images=args.num_images,
        callback=progress,
        truncate_prompt=args.truncate_prompt,
        prompt_weights=args.prompt_weights,
    )
    try:
        if init is None:
            images = pipe(args.prompt, height=height, width=width, **common)
        else:
            images = pipe.img2img(args.prompt, init, strength=strength, **common)
    finally:
        bar.close()
    for i, (image, path) in enumerate(zip(images, paths)):
        extra = {"Denoising strength": strength} if init is not None else {}
        extra.update({"Batch size": len(images), "Batch pos": i} if len(images) > 1 else {})
        extra.update(prompts.png_extras(args.truncate_prompt, args.prompt_weights))
        params = GenerationParams(
            prompt=args.prompt,
            negative_prompt=args.negative,
            steps=args.steps,
            sampler=scheduler,
            cfg_scale=args.guidance,
            seed=seed,
            width=image.width,
            height=image.height,
            model=pipe.name,
            extra=extra,
        )
        save_png(image, path, params.to_text())
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from speedsd.server import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    pipe = load_pipeline(args)
    serve(pipe, host=args.host, port=args.port, max_size=args.max_size)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from speedsd.bench.e2e import main as bench_main

    return int(bench_main(argv) or 0)


# ---- entry point -------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, OSError, UsageError, torch.cuda.OutOfMemoryError]
    try:
        from speedsd.loading import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, torch.cuda.OutOfMemoryError):
        msg = "out of GPU memory; try a smaller --size or --num-images"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torch.load(weights_only=True) warns about the pickle protocol of old .ckpt files; not the user's concern
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except _user_errors() as e:
        print(f"speedsd: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speedsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
