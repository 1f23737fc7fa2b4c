"""Euler discrete (Karras et al. 2022, Algorithm 2 without churn) in sigma space.

x is kept in the variance-exploding parametrisation x = x0 + sigma * eps (so init_noise_sigma > 1 and
the UNet sees x / sqrt(sigma^2 + 1)). One Euler step of dx/dsigma = (x - x0) / sigma:
    x_{i+1} = x_i + (x_i - x0_i) / sigma_i * (sigma_{i+1} - sigma_i)

Like diffusers, the sample is rounded to fp32 at the start of each step (``sample.to(float32)``) and
the result is cast to the model output's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from speedsd.schedulers.base import (
    Scheduler,
    SchedulerConfig,
    Timestep,
    _broadcast,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
)


class EulerScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.use_karras_sigmas = config.use_karras_sigmas
        self.sigmas = torch.zeros(1)  # fp32 [n + 1] on CPU after set_timesteps, last = 0

    def _set_timesteps(self, num_steps: int, device: torch.device | str | None) -> None:
        ts = spaced_timesteps(self.config, num_steps, round_linspace=False).astype(np.float32)
        acp = self.alphas_cumprod
        table = (((1 - acp) / acp) ** 0.5).numpy()  # fp32 [T], sigma of each training timestep
        sigmas = np.interp(ts, np.arange(len(table)), table)  # fp64 [n]
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
            ts = sigma_to_t(sigmas, np.log(table))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts.astype(np.float32)).to(device)

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float((sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        sigma = self.sigmas[self._current_index(t)]
        return sample / (sigma**2 + 1) ** 0.5

    def _pred_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        # v-prediction on the scaled input x / sqrt(sigma^2 + 1)
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)

    def _step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        i = self._current_index(t)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        derivative = (sample - self._pred_x0(model_output, sample, sigma)) / sigma
        prev = sample + derivative * (self.sigmas[i + 1] - sigma)
        self._step_index = i + 1
        return prev.to(model_output.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x = x0 + sigma_t * noise (sigma-space latents; the img2img start index when set)."""
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        return original + noise * _broadcast(sigmas[self._noise_indices(t)], original)
