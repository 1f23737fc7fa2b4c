"""Load a Stable Diffusion 1.x/2.x model into speedsd's modules.

    c = load_components("path/to/sd-v1-4", device="cuda", dtype=torch.float16)
    c.unet, c.text_encoder, c.vae, c.tokenizer, c.scheduler_config, c.default_scheduler

``model`` may be:

* a diffusers folder (model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/; weights as
  .safetensors or .bin, or the ``.fp16`` variants -- preferred when ``dtype`` is fp16);
* an original single-file checkpoint, ``.safetensors`` or ``.ckpt`` (see :mod:`speedsd.convert_original`).
  A ``.ckpt`` is read only with ``torch.load(weights_only=True)``: a pickle that wants to run code is
  refused (CheckpointError) and its code never runs;
* a hub id ("CompVis/stable-diffusion-v1-4"), taken from the local Hugging Face cache, or downloaded
  through huggingface_hub when it is installed and HF_HUB_OFFLINE is not set;
* ``random:<preset>`` (``random:sd1.4`` ...): random weights in the preset's exact geometry, for
  benchmarks (images are noise).

Weights go straight into the requested dtype/device: modules are built on the meta device and each
tensor is read, converted and assigned one at a time (``load_state_dict(assign=True)``), so no fp32
copy of the model is ever held. Checking is strict: every module tensor must come from the file with
the right shape and every file tensor must be used or be a known extra, else :class:`CheckpointError`
(one line, naming up to five keys of each kind). The CLI maps CheckpointError to exit code 2.

Prediction type of single SD 2.x files: the weights cannot tell epsilon (2.x-base, 512 px) from
v-prediction (2.x, 768 px). We default to v_prediction (the flagship 768 models; a wrong guess gives
visibly broken images, never a crash) unless the file name says "512" or "base" (Stability's names for
the epsilon files: 512-base-ema.ckpt, v2-1_512-ema-pruned.safetensors) or a .ckpt's global_step is
875000 (the SD 2.0-base release, as diffusers also checks). ``prediction_type=`` overrides all this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speedsd import arena, ops
from speedsd import convert_original as co
from speedsd.convert_original import CheckpointError
from speedsd.presets import FAMILY_DEFAULTS, MODEL_PRESETS, SCHEDULER_NAMES, ModelPreset
from speedsd.tokenizer import Tokenizer
from speedsd.weights import WeightReader, find_tokenizer_dir, open_weights, resolve_hub_id

__all__ = ["CheckpointError", "Components", "load_components"]

COMPONENTS = ("text_encoder", "unet", "vae")
PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


@dataclass
class Components:
    """Everything a pipeline needs, loaded and on its device."""

    text_encoder: nn.Module
    tokenizer: Tokenizer
    unet: nn.Module
    vae: nn.Module
    scheduler_config: Any  # speedsd.schedulers.base.SchedulerConfig
    default_scheduler: str
    name: str
    default_size: int
    family: str = "sd1"  # "sd1" | "sd2"


def _model_classes() -> dict[str, tuple[type, Callable[[Mapping[str, Any]], Any]]]:
    from speedsd.models.clip import CLIPTextConfig, CLIPTextModel
    from speedsd.models.unet import UNet2DCondition, UNetConfig
    from speedsd.models.vae import AutoencoderKL, VAEConfig

    return {
        "text_encoder": (CLIPTextModel, CLIPTextConfig.from_transformers),
        "unet": (UNet2DCondition, UNetConfig.from_diffusers),
        "vae": (AutoencoderKL, VAEConfig.from_diffusers),
    }


def _configs_from_dicts(dicts: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
    out = {}
    for comp, (_, from_dict) in _model_classes().items():
        try:
            out[comp] = from_dict(dicts[comp])
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{where}: unsupported {comp} config: {e}") from None
    in_ch = getattr(out["unet"], "in_channels", 4)
    if in_ch != 4:
        raise CheckpointError(f"{where}: unsupported architecture: UNet with {in_ch} input channels (inpainting?)")
    return out


def _meta_modules(configs: Mapping[str, Any]) -> dict[str, nn.Module]:
    classes = _model_classes()
    with torch.device("meta"):
        return {comp: classes[comp][0](configs[comp]) for comp in COMPONENTS}


def _expected(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _finish(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer the module does not save in its state dict: the loader cannot fill it
        raise RuntimeError(f"{what}: tensors left on the meta device after loading: {left[:5]}")
    return module.eval().requires_grad_(False)


def _slots(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Empty state-dict tensors in one allocation (:mod:`speedsd.arena`), 4-D weights already in the
    layout the device's default flags run in; the loaders fill them in place (``copy_`` casts)."""
    return arena.allocate(module, device, dtype, channels_last=ops.default_flags(device).channels_last)[0]


def _fill(
    module: nn.Module, device: torch.device, dtype: torch.dtype, get: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``get(key)`` for every state-dict key, copied into its slot one tensor at a time (peak: the
    model plus one source tensor)."""
    slots = _slots(module, device, dtype)
    for k, t in slots.items():
        t.copy_(get(k))
    return slots


def _problems(label: str, missing: list[str], unexpected: list[str], bad: list[str]) -> None:
    """Raise one CheckpointError line naming up to five keys of each kind."""
    if not (missing or unexpected or bad):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if keys:
            more = f", ... {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:5])}{more})")
    raise CheckpointError(f"{label}: tensors do not match the model: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# random:<preset>
# ---------------------------------------------------------------------------------------------


_POOL_SIZE = 1_000_003  # prime: no alignment with power-of-two tensor dims


def _fill_normal(t: torch.Tensor, std: float, gen: torch.Generator, pool: list[torch.Tensor]) -> None:
    """t ~ N(0, std^2). On the CPU, large tensors copy a window of one seeded N(0, 1) pool (a prime
    number of values, random start): ~10x faster than normal_, which would take ~20 s for SD's 1B
    parameters on two cores; the values are just as useless and harmless for benchmarking."""
    if t.device.type != "cpu" or t.numel() < 65536 or not t.is_contiguous():
        t.normal_(0.0, std, generator=gen)
        return
    if not pool:
        pool.append(torch.randn(_POOL_SIZE, generator=gen))
    flat, n = t.view(-1), t.numel()
    pos, off = 0, int(torch.randint(_POOL_SIZE, (1,), generator=gen))
    while pos < n:
        chunk = min(n - pos, _POOL_SIZE - off)
        torch.mul(pool[0][off : off + chunk], std, out=flat[pos : pos + chunk])
        pos, off = pos + chunk, 0


def _random_fill(module: nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator | None) -> nn.Module:
    """Materialize a meta module with random weights: N(0, 1/fan_in) matrices/convs, N(0, 0.02) vectors,
    norm weights 1 and biases 0 -- in-place fills, activations of order one in fp16. On the meta
    device (``gen`` None) only the shapes and dtype are set."""
    norm_params = {
        id(p) for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for p in m.parameters(False)
    }
    pool: list[torch.Tensor] = []
    state = _slots(module, device, dtype) if gen is not None else {}
    for name, p in module.state_dict(keep_vars=True).items():
        t = state[name] if gen is not None else torch.empty(p.shape, device=device, dtype=dtype)
        if gen is None:
            pass
        elif id(p) in norm_params:
            t.fill_(1.0 if name.endswith("weight") else 0.0)
        elif p.ndim >= 2:
            _fill_normal(t, p[0].numel() ** -0.5, gen, pool)  # fan_in = in_features (x kernel area)
        else:
            _fill_normal(t, 0.02, gen, pool)
        state[name] = t
    if gen is None:
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval().requires_grad_(False)
    return _finish(module, state, "random init")


def _load_random(name: str, device: torch.device, dtype: torch.dtype, tokenizer: Any, pred: str | None) -> Components:
    if name not in MODEL_PRESETS:
        raise CheckpointError(f"random:{name}: unknown preset; choose one of: {', '.join(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[name]
    from speedsd.models.clip import CLIP_PRESETS
    from speedsd.models.unet import UNET_PRESETS
    from speedsd.models.vae import VAE_PRESETS

    configs = {
        "text_encoder": CLIP_PRESETS[preset.clip],
        "unet": UNET_PRESETS[preset.unet],
        "vae": VAE_PRESETS[preset.vae],
    }
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)
    mods = {comp: _random_fill(m, device, dtype, gen) for comp, m in _meta_modules(configs).items()}
    tok = _tokenizer(f"random:{name}", None, tokenizer, preset, configs["text_encoder"].vocab_size, fallback=True)
    return _components(
        mods, tok, preset, preset.scheduler_dict(), preset.default_scheduler, name, preset.default_size, pred
    )


# ---------------------------------------------------------------------------------------------
# tokenizer, scheduler, assembly
# ---------------------------------------------------------------------------------------------


def _tokenizer(
    label: str, model_path: Path | None, explicit: Any, preset: ModelPreset, vocab_size: int, fallback: bool = False
) -> Tokenizer:
    pad = "!" if preset.family == "sd2" else None  # used only when the files do not name one
    try:
        where = find_tokenizer_dir(model_path, explicit, preset)
        if where is None and fallback:
            return Tokenizer.fallback(vocab_size, pad_id=0 if preset.family == "sd2" else None)
        if where is None:
            name = model_path.name if model_path is not None else label
            sub = f" (the {preset.tokenizer_subfolder}/ folder)" if preset.tokenizer_subfolder else ""
            raise CheckpointError(
                f"no CLIP tokenizer found for {name}: put vocab.json and merges.txt (from "
                f"{preset.tokenizer_hub_id}{sub}) in a tokenizer/ folder beside it, or pass --tokenizer DIR"
            )
        tok = Tokenizer.from_dir(where, pad_token=pad)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{label}: bad tokenizer: {e}") from None
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{label}: tokenizer has {tok.vocab_size} tokens, the text encoder only {vocab_size}")
    return tok


def _components(
    mods: Mapping[str, nn.Module],
    tok: Tokenizer,
    preset: ModelPreset,
    sched: dict[str, Any],
    default_scheduler: str,
    name: str,
    size: int,
    pred: str | None,
) -> Components:
    from speedsd.schedulers.base import SchedulerConfig

    if pred is not None:
        sched = {**sched, "prediction_type": pred}
    try:
        sched_cfg = SchedulerConfig.from_diffusers(sched)
    except ValueError as e:
        raise CheckpointError(f"{name}: unsupported scheduler config: {e}") from None
    return Components(
        text_encoder=mods["text_encoder"],
        tokenizer=tok,
        unet=mods["unet"],
        vae=mods["vae"],
        scheduler_config=sched_cfg,
        default_scheduler=default_scheduler,
        name=name,
        default_size=size,
        family=preset.family,
    )


def _family_of(text_cfg: Any) -> str:
    return "sd1" if getattr(text_cfg, "hidden_act", "quick_gelu") == "quick_gelu" else "sd2"


# ---------------------------------------------------------------------------------------------
# diffusers folder
# ---------------------------------------------------------------------------------------------


def _file_key(comp: str, key: str, shapes: Mapping[str, Any]) -> str:
    """The file key of module key ``key``: as is, or without ``text_model.`` (transformers 5 saves)."""
    if key in shapes or comp != "text_encoder":
        return key
    return key.removeprefix("text_model.")


def _load_component(
    module: nn.Module, reader: WeightReader, comp: str, label: str, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    shapes = reader.shapes
    expected = _expected(module)
    plan = {k: _file_key(comp, k, shapes) for k in expected}
    missing = sorted(f for f in plan.values() if f not in shapes)
    bad = [
        f"{f} {list(shapes[f])} (model {list(expected[k])})"
        for k, f in plan.items()
        if f in shapes and tuple(shapes[f]) != expected[k]
    ]
    used = set(plan.values())
    unexpected = sorted(f for f in shapes if f not in used and not f.endswith("embeddings.position_ids"))
    _problems(label, missing, unexpected, bad)
    return _finish(module, _fill(module, device, dtype, lambda k: reader.get(plan[k])), label)


def _read_json(path: Path, label: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{label}: missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{label}: unreadable {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{label}: {path} is not a JSON object")
    return data


def _weights_file(folder: Path, comp: str, dtype: torch.dtype, label: str) -> Path:
    stem = "model" if comp == "text_encoder" else "diffusion_pytorch_model"
    bin_stem = "pytorch_model" if comp == "text_encoder" else "diffusion_pytorch_model"
    variants = [".fp16", ""] if dtype == torch.float16 else ["", ".fp16"]
    names = [f"{stem}{v}.safetensors" for v in variants] + [f"{bin_stem}{v}.bin" for v in variants]
    for n in names:
        if (folder / comp / n).is_file():
            return folder / comp / n
    raise CheckpointError(f"{label}: no weights in {folder / comp} (looked for {', '.join(names)})")


def _load_diffusers(
    folder: Path, label: str, device: torch.device, dtype: torch.dtype, tokenizer: Any, pred: str | None
):
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{label}: not a diffusers folder (no model_index.json) nor a checkpoint file")
    index = _read_json(folder / "model_index.json", label)
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if cls not in _SUPPORTED_PIPELINES:
        raise CheckpointError(f"{label}: unsupported architecture: {cls} (speedsd runs SD 1.x/2.x text-to-image)")
    dicts = {comp: _read_json(folder / comp / "config.json", label) for comp in COMPONENTS}
    configs = _configs_from_dicts(dicts, label)
    family = _family_of(configs["text_encoder"])
    preset = MODEL_PRESETS[FAMILY_DEFAULTS[(family, "epsilon")]]
    tok = _tokenizer(label, folder, tokenizer, preset, configs["text_encoder"].vocab_size)  # fail fast
    mods = {}
    for comp, module in _meta_modules(configs).items():
        path = _weights_file(folder, comp, dtype, label)
        with open_weights(path) as reader:
            mods[comp] = _load_component(module, reader, comp, f"{label}: {comp}/{path.name}", device, dtype)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path, label) if sched_path.is_file() else preset.scheduler_dict()
    sched_cls = (index.get("scheduler") or [None, sched.get("_class_name")])[-1]
    default_scheduler = SCHEDULER_NAMES.get(str(sched_cls), preset.default_scheduler)
    sample = configs["unet"].sample_size  # latent side: int or (h, w)
    size = int(sample if isinstance(sample, int) else sample[0]) * int(configs["vae"].downscale)
    return _components(mods, tok, preset, sched, default_scheduler, label, size, pred)


# ---------------------------------------------------------------------------------------------
# original single file
# ---------------------------------------------------------------------------------------------


def _guess_prediction(path: Path, reader: WeightReader) -> str:
    if reader.global_step == 875000:
        return "epsilon"
    if re.search(r"(?<!\d)512(?!\d)|base", path.stem.lower()):
        return "epsilon"
    return "v_prediction"


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, tokenizer: Any, pred: str | None):
    label = path.name
    with open_weights(path) as reader:
        shapes = reader.shapes
        try:
            family = co.detect_family(shapes)
            dicts = co.infer_configs(shapes, family)
        except CheckpointError as e:
            raise CheckpointError(f"{label}: {e}") from None
        prediction = pred or ("epsilon" if family == "sd1" else _guess_prediction(path, reader))
        preset = MODEL_PRESETS[FAMILY_DEFAULTS[(family, prediction)]]
        if family == "sd2" and prediction == "v_prediction":  # as diffusers' SD 2.x 768-v config
            dicts["unet"].update(upcast_attention=True, sample_size=96)
        configs = _configs_from_dicts(dicts, label)
        tok = _tokenizer(label, path, tokenizer, preset, configs["text_encoder"].vocab_size)  # fail fast
        metas = _meta_modules(configs)
        plans: dict[str, dict[str, co.Source]] = {}
        missing, bad, used = [], [], set()
        for comp, module in metas.items():
            plans[comp] = {}
            for dkey, shape in _expected(module).items():
                src = co.source_for(comp, dkey, family, dicts, shapes)
                plans[comp][dkey] = src
                used.add(src.key)
                if src.key not in shapes:
                    missing.append(src.key)
                elif not co.shape_matches(src.op, tuple(shapes[src.key]), shape):
                    bad.append(f"{src.key} {list(shapes[src.key])} (model {comp}.{dkey} {list(shape)})")
        n_text = configs["text_encoder"].num_layers
        unexpected = sorted(k for k in shapes if k not in used and not co.is_ignored(k, family, n_text))
        _problems(label, missing, unexpected, bad)
        mods = {}
        for comp, module in metas.items():  # one component at a time: peak = model + one tensor
            plan = plans[comp]
            state = _fill(module, device, dtype, lambda k, plan=plan: co.materialize(plan[k], reader.get))
            mods[comp] = _finish(module, state, f"{label} {comp}")
    return _components(
        mods, tok, preset, preset.scheduler_dict(), preset.default_scheduler, label, preset.default_size, prediction
    )


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def load_components(
    model: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Load ``model`` (diffusers folder, single file, hub id or ``random:<preset>``); see the module doc.

    Raises CheckpointError for anything wrong with the model files (one line), ValueError for a bad
    ``prediction_type``.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    dev = torch.device(device if device is not None else "cpu")
    spec = str(model)
    if spec.startswith("random:"):
        return _load_random(spec.removeprefix("random:"), dev, dtype, tokenizer, prediction_type)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_diffusers(path, path.name, dev, dtype, tokenizer, prediction_type)
    if path.is_file():
        return _load_single_file(path, dev, dtype, tokenizer, prediction_type)
    if isinstance(model, str) and _HUB_ID.fullmatch(spec) and not spec.lower().endswith(_FILE_SUFFIXES):
        folder = resolve_hub_id(spec, dtype)
        return _load_diffusers(folder, spec, dev, dtype, tokenizer, prediction_type)
    raise CheckpointError(f"{spec}: no such file or directory")
