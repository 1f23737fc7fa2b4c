"""Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1) in sigma space.

Each step splits sigma_{i+1} into a deterministic part sigma_down and fresh noise sigma_up:
    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    x_{i+1}    = x_i + (x_i - x0_i) / sigma_i * (sigma_down - sigma_i) + sigma_up * z
z is drawn per step with ``torch.randn(shape, generator=generator, dtype=model_output.dtype)`` exactly as
diffusers does, so a seeded run matches it. No Karras sigmas (diffusers has none for this sampler).
"""

from __future__ import annotations

import torch

from speedsd.schedulers.base import SchedulerConfig, Timestep, randn
from speedsd.schedulers.euler import EulerScheduler


class EulerAncestralScheduler(EulerScheduler):
    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.use_karras_sigmas = False

    @property
    def draws_noise(self) -> bool:
        return True

    def _step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        i = self._current_index(t)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        x0 = self._pred_x0(model_output, sample, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev = prev + randn(model_output.shape, model_output, generator) * sigma_up
        self._step_index = i + 1
        return prev.to(model_output.dtype)
