"""The denoising loop: step by step, or replayed whole from one CUDA graph.

With ``flags.cuda_graphs`` on CUDA, a loop whose sampler draws no noise and that has no per-step
callback is captured once per (sampler, its settings, timesteps, guidance, input shapes) and then
replayed as ONE graph: every UNet evaluation, the classifier-free-guidance combine and the sampler
update, with no host work between steps. Everything else runs :func:`denoise_steps`, which replays
the per-step UNet graph (:meth:`speedsd.pipeline.Pipeline.unet_step`).

With ``flags.fused_epilogues`` the plumbing around each UNet call is two Triton kernels
(kernels/guidance.py) instead of torch's ~8 small launches: one makes the UNet input from the latents
(the uncond/cond copies, cast to the model dtype, layout), one upcasts the output and combines the
guidance halves. Same numbers; samplers whose input scaling the kernel cannot take over exactly keep
the torch path (see :data:`INPUT_SCALINGS`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from speedsd import ops
from speedsd.graphs import GraphCache
from speedsd.kernels.guidance import FLOATS, cfg_combine, cfg_input
from speedsd.schedulers.base import Scheduler
from speedsd.schedulers.euler import EulerScheduler

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
MAX_LOOP_GRAPHS = 4

# The samplers' scale_model_input implementations the fused input path reproduces exactly, by kind:
#   "identity": the sample itself (PNDM, DDIM, DPM++): cfg_input casts and duplicates, scale 1.
#   "rows": Euler's x / sqrt(sigma² + 1), one per-step 0-dim divisor for every element: the sampler
#           divides the N latents itself (a division, not a multiply by a Python float, so the kernel
#           does not redo it), then cfg_input casts and duplicates them.
# Any other implementation (a subclass's own) keeps the torch path.
INPUT_SCALINGS: dict[Callable[..., torch.Tensor], str] = {
    Scheduler.scale_model_input: "identity",
    EulerScheduler.scale_model_input: "rows",
}


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
    eager: bool = False,
) -> torch.Tensor:
    """``unet_step``: the UNet evaluation to call (default ``pipe.unet_step``, the per-step graph);
    one passed here always gets the torch plumbing. ``eager``: run the UNet eagerly (a loop that is
    itself being captured into a CUDA graph)."""
    fused = unet_step is None and fused_plumbing(pipe, sched, latents)
    if unet_step is None:
        unet_step = functools.partial(pipe.unet_step, eager=True) if eager else pipe.unet_step
    cfg = guidance_scale > 1.0
    num = len(timesteps)
    adds = pipe.time_adds(t_dev)  # every step's time embedding in one batch, ahead of the loop
    if fused:  # every step's UNet timesteps [S] -> [S, B], one launch ahead of the loop; row i is contiguous
        ts = t_dev[:, None].expand(-1, latents.shape[0] * (2 if cfg else 1)).contiguous()
        emb = emb.to(pipe.dtype)
    for i, t in enumerate(timesteps):
        adds_i = None if adds is None else adds[i]
        if fused:
            out = _fused_unet_eval(pipe, sched, latents, t, ts[i], emb, adds_i, guidance_scale, eager)
        else:
            x = torch.cat([latents, latents]) if cfg else latents  # [2N, 4, h, w]: uncond half first
            x = sched.scale_model_input(x, t)
            out = unet_step(x, t_dev[i], emb) if adds is None else unet_step(x, t_dev[i], emb, time_adds=adds_i)
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
        latents = sched.step(out, t, latents, generator=generator).to(pipe.latent_dtype)
        if callback is not None:
            callback(i, num, t, latents)
    return latents


def fused_plumbing(pipe: Any, sched: Any, latents: torch.Tensor) -> bool:
    """Whether :func:`denoise_steps` runs its CFG plumbing as the two guidance kernels: with
    ``flags.fused_epilogues``, the pipeline's own ``unet_step`` (not one replaced on the instance or
    overridden: wrappers and tests see its plain inputs), a sampler scaling listed in
    :data:`INPUT_SCALINGS`, fp32/fp16/bf16 models and latents on the model's device where Triton runs
    (ops' rule: CUDA, or the interpreter; elsewhere the flag raises as every fused kernel does)."""
    from speedsd.pipeline import Pipeline  # (pipeline imports this module)

    own_step = "unet_step" not in vars(pipe) and getattr(type(pipe), "unet_step", None) is Pipeline.unet_step
    return (
        own_step
        and pipe.flags.fused_epilogues
        and type(sched).scale_model_input in INPUT_SCALINGS
        and latents.dim() == 4
        and latents.dtype in FLOATS
        and pipe.dtype in FLOATS
        and latents.device == pipe.device
        and ops._kernel_ok(latents, "classifier-free guidance")
    )


def _fused_unet_eval(
    pipe: Any,
    sched: Any,
    latents: torch.Tensor,
    t: torch.Tensor,
    ts: torch.Tensor,
    emb: torch.Tensor,
    adds: torch.Tensor | None,
    guidance_scale: float,
    eager: bool,
) -> torch.Tensor:
    """One step's UNet evaluation with the plumbing in kernels: latents [N, 4, h, w] -> the (guided)
    model output [N, 4, h, w] in latent_dtype, the same numbers as the torch path of denoise_steps."""
    cfg = guidance_scale > 1.0
    if INPUT_SCALINGS[type(sched).scale_model_input] == "rows":
        latents = sched.scale_model_input(latents, t)  # elementwise, the same divisor for every row
    channels_last = bool(pipe.flags.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if cfg or latents.dtype != pipe.dtype or not latents.is_contiguous(memory_format=fmt):
        x = cfg_input(latents, 1.0, pipe.dtype, channels_last, duplicate=cfg)  # [2N or N, 4, h, w]
    else:
        x = latents  # already the UNet input (as .to / .contiguous would hand it over)
    out = pipe._unet_model_step(x, ts, emb, eager, adds)  # model dtype, [2N or N, 4, h, w]
    return cfg_combine(out, guidance_scale, pipe.latent_dtype) if cfg else out.to(pipe.latent_dtype)


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
    config, timesteps, guidance) and input shapes. The first call of a key runs the loop eagerly, the
    second captures it (after an eager warm-up on the capture stream), later ones replay.
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
            # A scope per run (warm-up and capture each project the text themselves), so the graph
            # holds ONE cross-attention K/V projection of its static text input for all its steps.
            # The per-step graph cannot be replayed inside this capture: the UNet runs eagerly here.
            with pipe.unet.context_scope():
                return denoise_steps(pipe, s, timesteps, x, e, guidance_scale, None, None, ts, eager=True)

        # the first image with these settings runs the loop eagerly; the second captures it
        cache = GraphCache(loop, max_entries=2, pool=pipe._pool, eager_fallback=False, capture_after=1)
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
