"""Samplers matching diffusers 0.42.1 step by step: PNDM (PLMS), DDIM, Euler, Euler ancestral, DPM++ 2M.

sched = make_scheduler("dpmpp_2m_karras", SchedulerConfig.from_diffusers(json.load(f)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from speedsd.schedulers.base import SD_V1, SD_V2_V, Scheduler, SchedulerConfig, alphas_cumprod
from speedsd.schedulers.ddim import DDIMScheduler
from speedsd.schedulers.dpmpp_2m import DPMPP2MScheduler
from speedsd.schedulers.euler import EulerScheduler
from speedsd.schedulers.euler_ancestral import EulerAncestralScheduler
from speedsd.schedulers.pndm import PNDMScheduler

# name -> factory. "euler" and "dpmpp_2m" follow config.use_karras_sigmas; "dpmpp_2m_karras" forces it on.
SCHEDULERS: dict[str, Callable[[SchedulerConfig], Scheduler]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerScheduler,
    "euler_a": EulerAncestralScheduler,
    "dpmpp_2m": DPMPP2MScheduler,
    "dpmpp_2m_karras": lambda cfg: DPMPP2MScheduler(dataclasses.replace(cfg, use_karras_sigmas=True)),
}


def make_scheduler(name: str, config: SchedulerConfig | None = None) -> Scheduler:
    """A fresh scheduler (they keep per-run state: make one per generation)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config if config is not None else SD_V1)


__all__ = [
    "SCHEDULERS",
    "SD_V1",
    "SD_V2_V",
    "DDIMScheduler",
    "DPMPP2MScheduler",
    "EulerAncestralScheduler",
    "EulerScheduler",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerConfig",
    "alphas_cumprod",
    "make_scheduler",
]
