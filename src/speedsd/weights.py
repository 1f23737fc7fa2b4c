"""Reading weight files safely, and finding model / tokenizer files on disk or in the hub cache.

    with open_weights("sd-v1-4.safetensors") as r:
        r.shapes["model.diffusion_model.out.2.weight"]   # (4, 320, 3, 3), read from the header only
        t = r.get("model.diffusion_model.out.2.weight")  # one tensor, on the CPU

``.safetensors`` files are opened lazily (header first, then one tensor at a time). Everything else
goes through ``torch.load(path, map_location="cpu", weights_only=True)`` (memory-mapped when the file
allows), which refuses any pickle that would build objects other than tensors and plain containers:
such a file raises :class:`CheckpointError` and none of its code runs.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from speedsd.convert_original import CheckpointError
from speedsd.tokenizer import has_tokenizer_files

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class WeightReader:
    """Key -> shape of every tensor in a file, and ``get(key)`` for one tensor (CPU)."""

    shapes: dict[str, tuple[int, ...]]
    global_step: int | None = None

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SafetensorsReader(WeightReader):
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self.shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self._f.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise CheckpointError(f"{path.name}: not a valid safetensors file ({_first_line(e)})") from None
        self._name = path.name

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - truncated data shows up here
            raise CheckpointError(f"{self._name}: cannot read tensor {key} ({_first_line(e)})") from None

    def close(self) -> None:
        self._f = None


class _DictReader(WeightReader):
    def __init__(self, state: Mapping[str, torch.Tensor], global_step: int | None) -> None:
        self._state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.global_step = global_step

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state = {}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: memory-mapped if the file allows, else read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mmapped: retry plainly
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path.name}: refused: not a plain tensor checkpoint, torch.load(weights_only=True) failed "
            f"({_first_line(e)}); speedsd never runs pickled code: convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file, random bytes ...
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({_first_line(e)})") from None


def open_weights(path: str | Path) -> WeightReader:
    """A reader for a .safetensors file, or a torch-saved state dict (``{"state_dict": ...}`` unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    with p.open("rb") as f:
        head = f.read(9)
    if p.suffix.lower() in _SAFETENSORS_SUFFIXES or (len(head) == 9 and head[8:9] == b"{"):
        return _SafetensorsReader(p)
    obj = _torch_load(p)
    step = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        step = obj.get("global_step") if isinstance(obj.get("global_step"), int) else None
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p.name}: not a checkpoint (holds a {type(obj).__name__}, not a state dict)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{p.name}: not a checkpoint (no tensors in it)")
    return _DictReader(tensors, step)


# ---------------------------------------------------------------------------------------------
# Hugging Face cache (read directly: huggingface_hub is optional)
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Where a family's CLIP tokenizer may already sit in the local hub cache: (repo, subfolder).
TOKENIZER_REPOS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (
        ("openai/clip-vit-large-patch14", ""),
        ("CompVis/stable-diffusion-v1-4", "tokenizer"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
        ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ),
    "sd2": (
        ("stabilityai/stable-diffusion-2-1", "tokenizer"),
        ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"),
        ("stabilityai/stable-diffusion-2-base", "tokenizer"),
    ),
}


def hub_cache_dir() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (the one refs/main names, else the newest), if any."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    dirs = sorted(snaps.iterdir(), key=lambda d: d.stat().st_mtime) if snaps.is_dir() else []
    return dirs[-1] if dirs else None


def find_tokenizer_dir(model_path: Path | None, explicit: str | Path | None, preset: Any) -> Path | None:
    """A folder with vocab.json + merges.txt: ``explicit``, else beside/inside the model, else the hub cache."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        for cand in (p, p / "tokenizer"):
            if has_tokenizer_files(cand):
                return cand
        if not p.exists() and _HUB_ID.fullmatch(str(explicit)):
            snap = cached_snapshot(str(explicit))
            for cand in (snap, snap / "tokenizer") if snap else ():
                if has_tokenizer_files(cand):
                    return cand
        raise CheckpointError(f"tokenizer {explicit}: no vocab.json and merges.txt there")
    if model_path is not None:
        cands = (
            [model_path / "tokenizer"] if model_path.is_dir() else [model_path.parent / "tokenizer", model_path.parent]
        )
        for cand in cands:
            if has_tokenizer_files(cand):
                return cand
    for repo, sub in TOKENIZER_REPOS.get(preset.family, ()):
        snap = cached_snapshot(repo)
        if snap is not None and has_tokenizer_files(snap / sub):
            return snap / sub
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str, dtype: torch.dtype) -> Path:
    """A local diffusers folder for hub id ``repo_id``: the cached snapshot, else a download.

    Downloads only the five components' configs and one weight format (fp16 variant first when
    ``dtype`` is fp16), and only when huggingface_hub is installed and HF_HUB_OFFLINE is not set.
    """
    snap = cached_snapshot(repo_id)
    if snap is not None and (snap / "model_index.json").is_file():
        return snap
    where = f"not in the local Hugging Face cache ({hub_cache_dir()})"
    todo = (
        f"download the diffusers folder of {repo_id} (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/) and pass its path, or a single .safetensors checkpoint"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: {where} and huggingface_hub is not installed: {todo}") from None
    if _offline():
        raise CheckpointError(f"{repo_id}: {where} and downloads are off (HF_HUB_OFFLINE): {todo}")
    configs = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"]
    variants = [".fp16", ""] if dtype == torch.float16 else ["", ".fp16"]
    attempts = [[f"{c}/{s}{v}.safetensors" for c, s in _STEMS] for v in variants]
    attempts += [[f"{c}/{s}{v}.bin" for c, s in _BIN_STEMS] for v in variants]
    last: Exception | None = None
    for weights in attempts:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=configs + weights, cache_dir=hub_cache_dir()))
        except Exception as e:  # noqa: BLE001 - network, auth, missing repo ...
            last = e
            continue
        if all((folder / w).is_file() for w in weights):
            return folder
    detail = f" ({_first_line(last)})" if last else ""
    raise CheckpointError(f"{repo_id}: download failed{detail}: {todo}")


_STEMS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))
_BIN_STEMS = (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "pytorch_model"),
)
