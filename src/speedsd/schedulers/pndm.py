"""PNDM in PLMS mode (skip_prk_steps=True, the SD 1.x default): pseudo linear multistep on eps.

The first two model evaluations form a Heun-like step (t -> t-r with eps_t, then re-evaluate at t-r
and redo the step from x_t with the mean of both eps); then Adams-Bashforth of order 2, 3, 4 on the
eps history. So ``timesteps`` has ``num_steps + 1`` entries (the second one repeated), like diffusers.

The transfer x_t -> x_{t'} given eps (Liu et al. 2022, eq. 11):
    x_{t'} = sqrt(a'/a) x_t - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
"""

from __future__ import annotations

import numpy as np
import torch

from speedsd.schedulers.base import SchedulerConfig, Timestep, spaced_timesteps
from speedsd.schedulers.ddim import AlphaScheduler


class PNDMScheduler(AlphaScheduler):
    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._reset()

    def _reset(self) -> None:
        self.counter = 0
        self.ets: list[torch.Tensor] = []  # raw model outputs of the last <= 4 steps
        self.cur_sample: torch.Tensor | None = None  # x_t kept for the Heun-like second evaluation

    def _set_timesteps(self, num_steps: int, device: torch.device | str | None) -> None:
        ts = spaced_timesteps(self.config, num_steps)  # descending
        # [t0, t1, t1, t2, ...]: the second timestep is evaluated twice
        self.timesteps = torch.from_numpy(np.concatenate([ts[:2], ts[1:]]).astype(np.int64)).to(device)
        self._reset()

    def _step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        t = int(t)
        t_prev = t - self._stride
        if self.counter == 1:  # second evaluation at t - r: redo the step t + r -> t from the kept x
            t_prev, t = t, t + self._stride
        else:
            self.ets = [*self.ets[-3:], model_output]
        e = self.ets
        if self.counter == 0:
            eps = model_output
            self.cur_sample = sample
        elif self.counter == 1 and len(e) == 1:
            eps = (model_output + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.counter += 1
        return self._transfer(sample, t, t_prev, eps)

    def _transfer(self, sample: torch.Tensor, t: int, t_prev: int, out: torch.Tensor) -> torch.Tensor:
        a_t, a_prev = self._alpha(t), self._alpha(t_prev)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":  # v -> eps
            out = a_t**0.5 * out + b_t**0.5 * sample
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * sample - (a_prev - a_t) * out / denom
