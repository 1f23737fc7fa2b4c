"""DDIM (Song et al. 2020): x_{t'} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s = eta * sigma_t(DDPM).

With eta = 0 (the default) the sampler is deterministic; eta > 0 draws z from ``generator`` exactly like
diffusers' ``DDIMScheduler.step(eta=...)``.
"""

from __future__ import annotations

import torch

from speedsd.schedulers.base import Scheduler, SchedulerConfig, Timestep, _broadcast, randn, spaced_timesteps


class AlphaScheduler(Scheduler):
    """Shared by DDIM and PNDM: integer timesteps indexing the fp32 alphas_cumprod table."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        # alpha_cumprod of the step "after" t = 0
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def _alpha(self, t: int) -> torch.Tensor:
        """alpha_cumprod at t as a 0-dim fp32 tensor; t < 0 means "past the end"."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    @property
    def _stride(self) -> int:
        return self.config.num_train_timesteps // self.num_steps

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, a_t taken in the sample's dtype."""
        acp = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        a_t = acp[torch.as_tensor(t, device=original.device).long().flatten()]  # [B] or [1]
        return _broadcast(a_t**0.5, original) * original + _broadcast((1 - a_t) ** 0.5, original) * noise


class DDIMScheduler(AlphaScheduler):
    def __init__(self, config: SchedulerConfig, eta: float = 0.0) -> None:
        super().__init__(config)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def _set_timesteps(self, num_steps: int, device: torch.device | str | None) -> None:
        self.timesteps = torch.from_numpy(spaced_timesteps(self.config, num_steps)).to(device)

    def _step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        t = int(t)
        t_prev = t - self._stride
        a_t, a_prev = self._alpha(t), self._alpha(t_prev)
        b_t = 1 - a_t
        if self.config.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        # DDPM posterior variance between t and t_prev, scaled by eta
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * randn(model_output.shape, model_output, generator)
        return prev
