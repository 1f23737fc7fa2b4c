"""DPM-Solver++(2M) (Lu et al. 2022): multistep second order on the data prediction x0, in log-SNR.

With alpha_t = 1 / sqrt(1 + sigma^2), s_t = sigma * alpha_t, lambda = log(alpha_t / s_t), h = lambda_t - lambda_s0:
    first order:  x_t = (s_t / s_s0) x - alpha_t (e^-h - 1) x0_0
    second order: x_t = (s_t / s_s0) x - alpha_t (e^-h - 1) (D0 + D1 / 2),
                  D0 = x0_0, D1 = (x0_0 - x0_1) h / (lambda_s0 - lambda_s1)
The first step and (with a zero final sigma, or < 15 steps) the last step are first order; the last
step to sigma = 0 returns x0 itself. Matches diffusers' DPMSolverMultistepScheduler(algorithm_type=
"dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True), including its
"leading" spacing over num_steps + 1 points and its Karras option (which ignores timestep_spacing).
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
)

FINAL_SIGMAS = ("zero", "sigma_min")


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t)."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha) - torch.log(sigma)


class DPMPP2MScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, final_sigmas_type: str = "zero") -> None:
        super().__init__(config)
        if final_sigmas_type not in FINAL_SIGMAS:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final_sigmas_type!r}")
        self.final_sigmas_type = final_sigmas_type
        self.sigmas = torch.zeros(1)  # fp32 [n + 1] on CPU after set_timesteps
        self._reset()

    def _reset(self) -> None:
        self.prev_x0: torch.Tensor | None = None  # data prediction of the previous step
        self.lower_order_nums = 0

    def _spaced(self, num_steps: int) -> np.ndarray:
        """DPM's own spacing (int64, descending): leading/linspace use num_steps + 1 points, drop t = 0."""
        cfg, t_train = self.config, self.config.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, t_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ts = np.arange(0, num_steps + 1) * (t_train // (num_steps + 1))
            return ts[::-1][:-1].astype(np.int64) + cfg.steps_offset
        return np.round(np.arange(t_train, 0, -t_train / num_steps)).astype(np.int64) - 1

    def _set_timesteps(self, num_steps: int, device: torch.device | str | None) -> None:
        acp = self.alphas_cumprod
        table = (((1 - acp) / acp) ** 0.5).numpy()  # fp32 [T]
        if self.config.use_karras_sigmas:  # over the full training range, not the spaced timesteps
            sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
            ts = sigma_to_t(sigmas, np.log(table)).round()
        else:
            ts = self._spaced(num_steps)
            sigmas = np.interp(ts, np.arange(len(table)), table)
        last = ((1 - acp[0]) / acp[0]) ** 0.5 if self.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.int64)
        self._reset()

    def _pred_x0(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(self.sigmas[i])
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output

    def _step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        i = self._current_index(t)
        n = len(self.timesteps)
        final_first_order = i == n - 1 and (n < 15 or self.final_sigmas_type == "zero")
        x0 = self._pred_x0(model_output, sample, i)
        x0_prev, self.prev_x0 = self.prev_x0, x0
        sample = sample.to(torch.float32)

        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        lambda_s0 = _lambda(alpha_s0, sigma_s0)
        h = _lambda(alpha_t, sigma_t) - lambda_s0
        if self.lower_order_nums < 1 or final_first_order:
            prev = sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * x0
        else:
            r0 = (lambda_s0 - _lambda(*_alpha_sigma(self.sigmas[i - 1]))) / h
            d1 = 1.0 / r0 * (x0 - x0_prev)
            coef = alpha_t * (torch.exp(-h) - 1.0)
            prev = sigma_t / sigma_s0 * sample - coef * x0 - 0.5 * coef * d1
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self._step_index = i + 1
        return prev.to(model_output.dtype)

    def _missing_index(self, t: Timestep) -> int:
        return len(self.timesteps) - 1  # as diffusers: an unknown timestep means "the last step"

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise (VP latents)."""
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        alpha, sigma = _alpha_sigma(_broadcast(sigmas[self._noise_indices(t)], original))
        return alpha * original + sigma * noise
