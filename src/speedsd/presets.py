"""Named Stable Diffusion models: which model geometry, scheduler defaults and image size each uses.

    preset = MODEL_PRESETS["sd2.1"]
    preset.unet                   # "sd2-v": a key of speedsd.models.unet.UNET_PRESETS
    preset.scheduler_config()     # SchedulerConfig(prediction_type="v_prediction", ...)

The scheduler values are those of each model's hub ``scheduler/scheduler_config.json``. The default
sampler follows each hub repo's ``model_index.json``: PNDM for SD 1.4/1.5 and SD 2.1-base, DDIM for
SD 2.1 (768, v-prediction). ``hub_id`` is a reference only: nothing here downloads anything.

SD 1.4 and 1.5 share one geometry (only the weights differ); so do the SD 2.x models, except that
the 768 v-prediction UNet ("sd2-v") computes attention scores in fp32 (diffusers' upcast_attention),
which its fp16 weights need to stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Shared by every SD 1.x/2.x scheduler config on the hub (scaled-linear betas, 1000 training steps).
_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# diffusers scheduler class (model_index.json / scheduler_config.json "_class_name") -> speedsd name.
SCHEDULER_NAMES: dict[str, str] = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}  # any other class: the family's default (pndm)


@dataclass(frozen=True)
class ModelPreset:
    """One named model. ``clip``/``unet``/``vae`` are keys of CLIP_PRESETS / UNET_PRESETS / VAE_PRESETS."""

    name: str
    family: str  # "sd1" | "sd2": tokenizer pad token, single-file key layout
    clip: str
    unet: str
    vae: str
    scheduler: tuple[tuple[str, Any], ...]  # diffusers scheduler_config.json items (hashable)
    default_scheduler: str  # speedsd sampler name, from the hub model_index.json
    default_size: int  # pixels per side the model was trained at
    hub_id: str  # reference only
    tokenizer_hub_id: str  # where the CLIP tokenizer files live on the hub (reference / local cache)
    tokenizer_subfolder: str = ""  # "" = repo root

    @property
    def prediction_type(self) -> str:
        return self.scheduler_dict()["prediction_type"]

    def scheduler_dict(self) -> dict[str, Any]:
        """The diffusers-style scheduler config dict (a fresh copy)."""
        return dict(self.scheduler)

    def scheduler_config(self, prediction_type: str | None = None) -> Any:
        """A :class:`speedsd.schedulers.base.SchedulerConfig`, optionally with another prediction type."""
        from speedsd.schedulers.base import SchedulerConfig

        cfg = self.scheduler_dict()
        if prediction_type is not None:
            cfg["prediction_type"] = prediction_type
        return SchedulerConfig.from_diffusers(cfg)


def _sched(**changes: Any) -> tuple[tuple[str, Any], ...]:
    return tuple({**_BASE_SCHEDULER, **changes}.items())


_SD1_TOKENIZER = ("openai/clip-vit-large-patch14", "")
_SD2_TOKENIZER = ("stabilityai/stable-diffusion-2-1", "tokenizer")

MODEL_PRESETS: dict[str, ModelPreset] = {
    # Not a real model: a few-MB geometry with every block type, for smoke tests and `speedsd bench` on CPU.
    "tiny": ModelPreset("tiny", "sd1", "tiny", "tiny", "tiny", _sched(), "pndm", 64, "none", *_SD1_TOKENIZER),
    "sd1.4": ModelPreset(
        "sd1.4", "sd1", "sd1", "sd1", "sd", _sched(), "pndm", 512, "CompVis/stable-diffusion-v1-4", *_SD1_TOKENIZER
    ),
    "sd1.5": ModelPreset(
        "sd1.5",
        "sd1",
        "sd1",
        "sd1",
        "sd",
        _sched(),
        "pndm",
        512,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        *_SD1_TOKENIZER,
    ),
    "sd2.1-base": ModelPreset(
        "sd2.1-base",
        "sd2",
        "sd2",
        "sd2",
        "sd",
        _sched(),
        "pndm",
        512,
        "stabilityai/stable-diffusion-2-1-base",
        *_SD2_TOKENIZER,
    ),
    "sd2.1": ModelPreset(
        "sd2.1",
        "sd2",
        "sd2",
        "sd2-v",
        "sd",
        _sched(prediction_type="v_prediction"),
        "ddim",
        768,
        "stabilityai/stable-diffusion-2-1",
        *_SD2_TOKENIZER,
    ),
}

# The preset whose defaults a single-file checkpoint of a family gets (its weights cannot tell
# SD 1.4 from 1.5, nor, for SD 2.x, epsilon from v-prediction: see speedsd.loading).
FAMILY_DEFAULTS: dict[tuple[str, str], str] = {
    ("sd1", "epsilon"): "sd1.5",
    ("sd2", "epsilon"): "sd2.1-base",
    ("sd2", "v_prediction"): "sd2.1",
}


def get_preset(name: str) -> ModelPreset:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None
