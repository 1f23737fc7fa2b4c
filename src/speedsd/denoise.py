"""The denoising loop: step by step, or replayed whole from one CUDA graph.

With ``flags.cuda_graphs`` on CUDA, a loop whose sampler draws no noise and that has no per-step
callback is captured once per (sampler, its settings, timesteps, guidance, input shapes) and then
replayed as ONE graph: every UNet evaluation, the classifier-free-guidance combine and the sampler
update, with no host work between steps. Everything else runs :func:`denoise_steps`, which replays
the per-step UNet graph (:meth:`speedsd.pipeline.Pipeline.unet_step`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from speedsd.graphs import GraphCache

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
MAX_LOOP_GRAPHS = 4


def denoise(
    pipe: Any,
    sched: Any,
    timesteps: list[torch.Tensor],
    latents: torch.Tensor,
    emb: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator,
    callback: StepCallback | None,
) -> torch.Tensor:
    # the UNet's copy of every timestep, moved to the device once (indexing it needs no sync)
    t_dev = torch.stack([torch.as_tensor(t) for t in timesteps]).to(pipe.device)
    if pipe._pool is not None and callback is None and not sched.draws_noise:
        out = denoise_graphed(pipe, sched, timesteps, latents, emb, guidance_scale, t_dev)
        if out is not None:
            return out
    # eager: the text's cross-attention K/V once for the whole loop; per-step graphs project it each replay
    with pipe.unet.context_scope() if pipe._pool is None else contextlib.nullcontext():
        return denoise_steps(pipe, sched, timesteps, latents, emb, guidance_scale, generator, callback, t_dev)


def denoise_steps(
    pipe: Any,
    sched: Any,
    timesteps: list[torch.Tensor],
    latents: torch.Tensor,
    emb: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator | None,
    callback: StepCallback | None,
    t_dev: torch.Tensor,
    unet_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``unet_step``: the UNet evaluation to call (default ``pipe.unet_step``, the per-step graph)."""
    unet_step = unet_step or pipe.unet_step
    cfg = guidance_scale > 1.0
    num = len(timesteps)
    adds = pipe.time_adds(t_dev)  # every step's time embedding in one batch, ahead of the loop
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if cfg else latents  # [2N, 4, h, w]: uncond half first
        x = sched.scale_model_input(x, t)
        out = unet_step(x, t_dev[i], emb) if adds is None else unet_step(x, t_dev[i], emb, time_adds=adds[i])
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        latents = sched.step(out, t, latents, generator=generator).to(pipe.latent_dtype)
        if callback is not None:
            callback(i, num, t, latents)
    return latents


def denoise_graphed(
    pipe: Any,
    sched: Any,
    timesteps: list[torch.Tensor],
    latents: torch.Tensor,
    emb: torch.Tensor,
    guidance_scale: float,
    t_dev: torch.Tensor,
) -> torch.Tensor | None:
    """The whole loop (every UNet step, CFG and sampler update) replayed from ONE CUDA graph.

    The sampler's per-step numbers are Python floats, so a graph is captured per (sampler, its
    config, timesteps, guidance) and input shapes; each capture runs the loop once eagerly first.
    Samplers that draw noise are never captured. None: capture failed, use the per-step path.
    """
    key = (type(sched).__name__, repr(sched.config), tuple(int(t) for t in timesteps), float(guidance_scale))
    key += tuple(sorted((k, repr(v)) for k, v in vars(sched).items() if isinstance(v, (int, float, bool, str))))
    if key in pipe._loop_graphs:
        pipe._loop_graphs.move_to_end(key)
        cache = pipe._loop_graphs[key]
    else:
        template = copy.deepcopy(sched)  # fresh sampler state for every (re)run of the loop

        def loop(x: torch.Tensor, e: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            s = copy.deepcopy(template)
            # the per-step graph cannot be replayed inside this capture: the UNet runs eagerly here
            eager = functools.partial(pipe.unet_step, eager=True)
            # A scope per run (warm-up and capture each project the text themselves), so the graph
            # holds ONE cross-attention K/V projection of its static text input for all its steps.
            with pipe.unet.context_scope():
                return denoise_steps(pipe, s, timesteps, x, e, guidance_scale, None, None, ts, unet_step=eager)

        cache = GraphCache(loop, max_entries=2, pool=pipe._pool, eager_fallback=False)
        pipe._loop_graphs[key] = cache
        if len(pipe._loop_graphs) > MAX_LOOP_GRAPHS:
            pipe._loop_graphs.popitem(last=False)
    if cache is None:
        return None
    try:
        return cache(latents, emb, t_dev)
    except RuntimeError as e:
        warnings.warn(f"whole-loop CUDA graph capture failed ({str(e).splitlines()[0][:120]}); "
                      "replaying the UNet step by step", stacklevel=3)  # fmt: skip
        pipe._loop_graphs[key] = None
        return None
