"""Shared scheduler pieces: the config, the noise table, timestep spacing and the abstract ``Scheduler``.

Every scheduler here reproduces diffusers 0.42.1's scheduler of the same config step by step. To get
there the tables keep diffusers' dtypes: betas/alphas_cumprod and the per-step sigmas are fp32, the
spacing arithmetic is numpy fp64, and the per-step scalar coefficients are 0-dim fp32 tensors that
multiply the (fp32, fp16 or fp64) sample. Changing any of those (e.g. computing the tables in fp64)
gives a "more exact" sampler that no longer matches diffusers to 1e-6.

Pipeline usage (one fresh scheduler per generation; PNDM and DPM++ keep a history):

    sched = make_scheduler("euler", cfg)
    sched.set_timesteps(25, device)
    x = randn(...) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t, text)
        x = sched.step(eps, t, x, generator)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

Timestep = int | float | torch.Tensor


@dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of the trained model (diffusers' scheduler_config.json, the keys we use).

    The defaults are Stable Diffusion 1.x's (``SD_V1``).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM/PNDM: alpha_cumprod "before t=0" is 1 (else alphas_cumprod[0])
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    clip_sample: bool = False  # DDIM only: clamp the predicted x0 to [-1, 1]
    use_karras_sigmas: bool = False  # Euler / DPM++ only

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"unsupported {name} {value!r}; choose one of: {', '.join(allowed)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers ``scheduler_config.json`` dict; unknown keys and null values are ignored.

        Missing keys take *our* defaults (SD 1.x), not the defaults of the diffusers class named in
        ``_class_name`` (e.g. an SD-1.4 config has no ``timestep_spacing``: we use "leading").
        """
        if cfg.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; only beta_schedule 'scaled_linear'/'linear'")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known and v is not None})


SD_V1 = SchedulerConfig()  # SD 1.4 / 1.5 (epsilon)
SD_V2_V = SchedulerConfig(prediction_type="v_prediction")  # SD 2.x 768-v


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s) for t in [0, T), fp32 [T] (same fp32 ops as diffusers)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # scaled_linear: linear in sqrt(beta)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(cfg: SchedulerConfig, num_steps: int, *, round_linspace: bool = True) -> np.ndarray:
    """The inference timesteps, descending (numpy; int64, or float64 for unrounded linspace).

    leading:  [0, r, 2r, ...] + steps_offset with r = T // n   (SD 1.x default: 981, 961, ... 1 for n=50)
    trailing: round(T, T - T/n, ...) - 1                     (always starts at T - 1)
    linspace: round(linspace(0, T - 1, n))                   (Euler keeps it unrounded)
    """
    t_train = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, t_train - 1, num_steps)
        return (ts.round().astype(np.int64) if round_linspace else ts)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ts = np.arange(0, num_steps) * (t_train // num_steps) + cfg.steps_offset
        return ts[::-1].astype(np.int64)
    return np.round(np.arange(t_train, 0, -t_train / num_steps)).astype(np.int64) - 1


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma (fp64 [n])."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))  # [n]
    dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # last index <= sigma
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho (fp64)."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def randn(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn exactly like diffusers' ``randn_tensor`` (single generator).

    A CPU generator with a non-CPU ``like`` draws on the CPU and moves the result, so a seeded run gives
    the same noise on any device.
    """
    draw_device = like.device
    if generator is not None and generator.device.type == "cpu" and like.device.type != "cpu":
        draw_device = torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=like.dtype)
    return noise.to(like.device)


def _broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-batch coefficients [B] (or [1]) -> [B, 1, ..., 1] to multiply x [B, ...]."""
    return coef.flatten().reshape(-1, *([1] * (x.dim() - 1)))


class Scheduler(ABC):
    """A sampler: the timestep list plus the update x_t -> x_{t-1} given the model's output.

    Stateful (step counter, multistep history): build a fresh one per generation with ``make_scheduler``.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # fp32 [T], on CPU
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self.num_steps = 0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial latent noise (1 for VP samplers)."""
        return 1.0

    @property
    def draws_noise(self) -> bool:
        """True when ``step`` draws random noise (from a CPU generator): such a loop cannot be replayed
        from one CUDA graph."""
        return False

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> None:
        """Compute ``timesteps`` for ``num_steps`` model evaluations and reset all per-run state."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
            raise ValueError(f"num_steps must be an int, got {num_steps!r}")
        if not 1 <= num_steps <= self.config.num_train_timesteps:
            raise ValueError(
                f"num_steps must be between 1 and num_train_timesteps={self.config.num_train_timesteps}, "
                f"got {num_steps}"
            )
        self.num_steps = int(num_steps)
        self._step_index = None
        self._begin_index = None
        self._set_timesteps(self.num_steps, device)

    @abstractmethod
    def _set_timesteps(self, num_steps: int, device: torch.device | str | None) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The UNet input for ``sample`` at ``t`` (identity for VP samplers)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One denoising step: returns the sample at the next (smaller) timestep."""
        if self.num_steps == 0:
            raise RuntimeError("call set_timesteps() before step()")
        return self._step(model_output, t, sample, generator)

    @abstractmethod
    def _step(
        self, model_output: torch.Tensor, t: Timestep, sample: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor: ...

    @abstractmethod
    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """Forward-diffuse clean latents ``original`` [B, ...] to timestep ``t`` (scalar or [B]) for img2img."""

    def timesteps_for_strength(
        self, num_steps: int, strength: float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, int]:
        """img2img: call ``set_timesteps(num_steps)`` and keep the last ``int(num_steps * strength)`` steps.

        Returns ``(timesteps[t_start:], t_start)``, as diffusers' img2img ``get_timesteps`` (which returns
        ``num_steps - t_start`` instead of ``t_start``), and makes the scheduler start at index ``t_start``.
        Noise the init latents with ``add_noise(latents, noise, timesteps[:1])``.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.set_timesteps(num_steps, device)
        init_steps = min(int(num_steps * strength), num_steps)
        t_start = max(num_steps - init_steps, 0)
        self._begin_index = t_start
        return self.timesteps[t_start:], t_start

    # -- helpers for the sigma-indexed samplers (Euler, DPM++) ------------------------------------------

    def _lookup_index(self, t: Timestep) -> int:
        """Position of ``t`` in ``timesteps`` (the second hit if it occurs twice, as diffusers)."""
        hits = (self.timesteps.cpu() == torch.as_tensor(t).cpu()).nonzero()
        if len(hits) == 0:
            return self._missing_index(t)
        return int(hits[1 if len(hits) > 1 else 0])

    def _missing_index(self, t: Timestep) -> int:
        raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self.timesteps.tolist()}")

    def _current_index(self, t: Timestep) -> int:
        """Step index for the step at ``t``: fixed on the first call, then counted."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._lookup_index(t)
        return self._step_index

    def _noise_indices(self, t: Timestep) -> list[int]:
        """Sigma indices for add_noise: the img2img start index if set, else each t's position."""
        ts = torch.as_tensor(t).flatten()
        if self._begin_index is None:
            return [self._lookup_index(x) for x in ts]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(ts)
