"""Text-to-image and image-to-image generation: the user-facing :class:`Pipeline` and :func:`load`.

    pipe = speedsd.load("path/to/model")          # diffusers folder, single file, or random:sd1.4
    [image] = pipe("a red fox in the snow", seed=42)

Semantics follow diffusers' StableDiffusionPipeline (the tests use it as the oracle), with two
deliberate choices:

* Seeded noise is drawn on the CPU with ``torch.Generator("cpu").manual_seed(seed)`` in fp32 and only
  then moved to the device and dtype, so one seed gives the same starting noise on every device and
  in every dtype. The same generator then feeds the sampler's own noise (Euler a) and img2img's VAE
  posterior sample and forward noise, in the order diffusers draws them.
* Latents and the scheduler arithmetic stay in fp32 (fp64 for an fp64 model) between UNet calls; only
  the model inputs are cast to the model dtype.

The hot path is two small methods, :meth:`Pipeline.unet_step` and :meth:`Pipeline.decode_latents`;
with ``flags.cuda_graphs`` on a CUDA device both replay CUDA graphs (:mod:`speedsd.graphs`) captured
once per input signature. Every model call runs inside ``ops.using(self.flags)``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from speedsd import arena, decode, ops
from speedsd.denoise import StepCallback, denoise
from speedsd.graphs import GraphCache
from speedsd.inputs import (
    check_common,
    check_seed,
    check_size,
    check_strength,
    negatives_list,
    preprocess_image,
    prompts_list,
)
from speedsd.prompts import apply_weights, prompt_ids

# unet module -> (memory format its weights (and the VAE's) are in, conversion count)
_LAYOUT: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.memory_format, int]] = weakref.WeakKeyDictionary()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load(
    model: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    flags: ops.Flags | None = None,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
) -> Pipeline:
    """Load a model (diffusers folder, single checkpoint file, or ``random:sd1.4``) as a Pipeline.

    device None -> cuda when available else cpu; dtype None -> fp16 on cuda, fp32 elsewhere;
    flags None -> :func:`speedsd.ops.default_flags` for the device.
    """
    from speedsd.loading import load_components

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    components = load_components(
        model, device=device, dtype=dtype, tokenizer=tokenizer, prediction_type=prediction_type
    )
    return Pipeline(components, flags=flags)


# ---- the pipeline ------------------------------------------------------------------------------


class Pipeline:
    """Stable Diffusion text-to-image / image-to-image over loaded :class:`Components`."""

    def __init__(self, components: Any, flags: ops.Flags | None = None) -> None:
        self.components = components
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.unet = components.unet
        self.vae = components.vae
        param = next(self.unet.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        self.flags: ops.Flags = flags if flags is not None else ops.default_flags(self.device)
        self.name: str = getattr(components, "name", "model")
        self.default_size: int = getattr(components, "default_size", 512)
        self.last_seed: int | None = None  # the seed the last call used (drawn when none was given)
        for m in self.models():
            m.eval()
        # CUDA graphs: one capture per input signature (shape, dtype, layout), replayed afterwards.
        self._text_graphs: GraphCache | None = None
        self._unet_graphs: GraphCache | None = None
        self._decode_graphs: GraphCache | None = None
        # whole denoising loops (every step, CFG and sampler update in one graph), per sampler setting
        self._loop_graphs: OrderedDict[tuple[Any, ...], GraphCache | None] = OrderedDict()
        self._pool: tuple[int, int] | None = None
        if self.flags.cuda_graphs and self.device.type == "cuda":
            pool = torch.cuda.graph_pool_handle()  # these run one after another: one memory pool
            self._pool = pool
            # once-per-image functions run eagerly on their first call (see GraphCache's capture_after)
            self._text_graphs = GraphCache(self._text_forward, max_entries=4, pool=pool, capture_after=1)
            self._unet_graphs = GraphCache(self._unet_forward, pool=pool)
            self._decode_graphs = GraphCache(self._vae_decode, max_entries=4, pool=pool, capture_after=1)
        self._layout_version = -1
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        """Give the (shared) weights this pipeline's layout; drop graphs captured on older weight tensors.

        ``with_flags`` copies share the models. Converting the weights between NCHW and channels_last
        swaps their storage, which graphs captured by any sharing pipeline read by address, so every
        conversion bumps a version and each pipeline re-captures when it sees a new one.
        """
        fmt = torch.channels_last if self.flags.channels_last else torch.contiguous_format
        state = _LAYOUT.get(self.unet)
        if state is None or state[0] != fmt:
            for m in (self.unet, self.vae):  # inside their own bytes: the weight arena stays whole
                arena.relayout(m, fmt)
            state = (fmt, 0 if state is None else state[1] + 1)
            _LAYOUT[self.unet] = state
        if state[1] != self._layout_version:
            self.reset_graphs()
            self._layout_version = state[1]

    def models(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.unet, self.vae]

    def with_flags(self, flags: ops.Flags) -> Pipeline:
        """A pipeline over the same (shared, not copied) models with other flags."""
        return type(self)(self.components, flags=flags)

    def reset_graphs(self) -> None:
        """Drop captured CUDA graphs (call after changing weights in a way the graphs cached)."""
        for cache in (self._text_graphs, self._unet_graphs, self._decode_graphs):
            if cache is not None:
                cache.reset()
        self._loop_graphs.clear()

    # -- small pieces, each swappable -------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return int(getattr(self.vae.config, "downscale", 8))

    @property
    def size_multiple(self) -> int:
        return max(8, self.vae_scale)

    @property
    def latent_dtype(self) -> torch.dtype:
        """Latents and scheduler math: fp32, or fp64 for an fp64 model (the tests' exact oracle runs)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def latent_channels(self) -> int:
        cfg = getattr(self.unet, "config", None)
        return int(getattr(cfg, "in_channels", 4))

    def make_scheduler(self, name: str | None) -> Any:
        from speedsd.schedulers import make_scheduler

        return make_scheduler(name or self.components.default_scheduler, self.components.scheduler_config)

    @torch.inference_mode()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, k·77] (k blocks, see Tokenizer) -> text embeddings [B, k·77, D] in the model dtype:
        each block is encoded on its own, the blocks' embeddings side by side."""
        ids = ids.to(self.device)
        b, n = ids.shape
        block = self.tokenizer.max_length
        if n % block:
            raise ValueError(f"token ids must be blocks of {block}, got {n} a row")
        run = self._text_graphs if self._text_graphs is not None else self._text_forward
        emb = run(ids.reshape(-1, block))  # [B, k·77] -> [B·k, 77]: one text-encoder batch
        return emb.reshape(b, n, emb.shape[-1]).to(self.dtype)  # [B·k, 77, D] -> [B, k·77, D]

    def _text_forward(self, ids: torch.Tensor) -> torch.Tensor:
        with ops.using(self.flags):
            return self.text_encoder(ids)

    def encode_text(self, prompts: list[str], chunks: int = 1) -> torch.Tensor:
        """[B] strings -> [B, chunks·77, D] text embeddings in the model dtype."""
        return self.encode_ids(self.tokenizer(prompts, chunks))  # ids [B, chunks·77]

    def text_embeddings(
        self,
        prompts: list[str],
        negatives: list[str],
        num_images: int,
        cfg: bool,
        truncate_prompt: bool = False,
        prompt_weights: bool = False,
    ) -> torch.Tensor:
        """[uncond; cond] (or just cond) embeddings, each prompt repeated num_images times in a row. Prompts
        past 75 tokens are read in blocks of 75 (every row as many as the longest needs), unless
        ``truncate_prompt`` (diffusers' way: the first 75 tokens only). ``prompt_weights``: read the
        emphasis syntax, (text), [text], (text:1.3) (speedsd.prompts)."""
        texts = negatives + prompts if cfg else prompts
        ids, weights = prompt_ids(self.tokenizer, texts, truncate_prompt, prompt_weights)
        emb = self.encode_ids(ids)  # one text-encoder batch
        if weights is not None:
            emb = apply_weights(emb, weights, self.tokenizer.max_length)
        return emb.repeat_interleave(num_images, dim=0)  # [p0, p0, p1, p1, ...] as diffusers orders them

    @torch.inference_mode()
    def unet_step(
        self,
        latent_model_input: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        eager: bool = False,
        time_adds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One UNet evaluation: [N, 4, h, w] latents (any float dtype) -> model output in latent_dtype.

        With ``flags.cuda_graphs`` on CUDA it replays a graph captured per input signature (unless
        ``eager``: a caller that is itself being captured). ``time_adds``: t's row of
        :meth:`time_adds`, computed ahead for the whole loop.
        """
        x = latent_model_input.to(self.device, self.dtype)
        if self.flags.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ts = torch.as_tensor(t, device=self.device).reshape(-1).expand(x.shape[0]).contiguous()  # scalar -> [N]
        return self._unet_model_step(x, ts, text_embeddings.to(self.dtype), eager, time_adds).to(self.latent_dtype)

    @torch.inference_mode()
    def _unet_model_step(
        self,
        x: torch.Tensor,
        ts: torch.Tensor,
        emb: torch.Tensor,
        eager: bool = False,
        time_adds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`unet_step` on inputs already made for the model: x [B, 4, h, w] in the model dtype,
        device and layout, ts [B], emb in the model dtype. Returns the raw model output (model dtype):
        the denoising loop prepares and combines these with its own kernels (kernels/guidance.py)."""
        self._ensure_layout()
        run = self._unet_graphs if self._unet_graphs is not None and eager is False else self._unet_forward
        extra = () if time_adds is None else (time_adds,)
        return run(x, ts, emb, *extra)

    def time_adds(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The UNet's per-block time pre-adds of every timestep [S] -> [S, ΣC] (one batch for a whole
        loop), or None when the flags do not use them."""
        with ops.using(self.flags):
            return self.unet.time_adds(timesteps.to(self.device))

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Scaled latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1] (model dtype)."""
        self._ensure_layout()
        z = (z / self.vae.config.scaling_factor).to(self.device, self.dtype)
        if self.flags.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        if tiled:
            with ops.using(self.flags):
                return self.vae.decode_tiled(z)
        run = self._decode_graphs if self._decode_graphs is not None else self._vae_decode
        return run(z)

    def _unet_forward(
        self, x: torch.Tensor, ts: torch.Tensor, emb: torch.Tensor, adds: torch.Tensor | None = None
    ) -> torch.Tensor:
        # A step outside a denoising loop's scope (a standalone unet_step; the per-step graphs of samplers that
        # draw noise or of a loop with a callback) is a scope of its own: its 16² and 32² upsamplers run as
        # sub-pixel convs on weights it folds itself, the fold replayed with its graph. At 512² on an H200 the
        # step goes 4.77-4.84 -> 4.68-4.73 ms back to back and holds 64 MiB more while it runs, in the pool it
        # shares with the VAE decode (bench/results/step_subpixel_h200.txt, step_subpixel_h200_b.txt).
        with ops.using(self.flags), ops.loop_scope(inner=True):
            return self.unet(x, ts, emb) if adds is None else self.unet(x, ts, emb, time_adds=adds)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        with ops.using(self.flags):
            return self.vae.decode(z)

    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> scaled latents: a posterior sample drawn with ``generator``."""
        self._ensure_layout()
        x = image.to(self.device, self.dtype)
        if self.flags.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ops.using(self.flags):
            mean, logvar = self.vae.encode(x)
        mean, logvar = mean.to(self.latent_dtype), logvar.to(self.latent_dtype).clamp(-30.0, 20.0)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device, self.latent_dtype)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.vae.config.scaling_factor

    # -- user entry points -----------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        height: int | None = 512,
        width: int | None = 512,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        scheduler: str | None = "pndm",
        num_images: int = 1,
        callback: StepCallback | None = None,
        output: str = "pil",
        tiled_decode: bool | None = None,
        truncate_prompt: bool = False,
        prompt_weights: bool = False,
    ) -> list[Any] | torch.Tensor:
        """Generate images from text.

        Returns a list of PIL images (output="pil"), a float32 (fp64 for an fp64 model) [N, 3, H, W] tensor in [0, 1]
        (output="tensor") or the final scaled latents [N, 4, H/8, W/8] (output="latent"), where
        N = len(prompts) * num_images. ``callback(step_index, num_steps, timestep, latents)`` runs
        after every step. height/width None -> the model's default size. A prompt past the text encoder's
        75 tokens is read in blocks of 75, up to 600 tokens (AUTOMATIC1111's way); ``truncate_prompt``
        reads the first 75 only, as diffusers does. ``prompt_weights`` reads AUTOMATIC1111's emphasis,
        (text) / [text] / (text:1.3); without it brackets are plain text, as in diffusers.
        """
        prompts = prompts_list(prompt)
        negatives = negatives_list(negative_prompt, len(prompts))
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        scheduler = scheduler or self.components.default_scheduler
        check_size(height, width, self.size_multiple)
        check_common(steps, guidance_scale, num_images, scheduler, output)
        check_seed(seed)
        n = len(prompts) * num_images
        shape = (n, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape {shape}, got {got}")

        generator = self._generator(seed, need_seed=latents is None)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = latents.to(self.device, self.latent_dtype)

        cfg = guidance_scale > 1.0
        emb = self.text_embeddings(prompts, negatives, num_images, cfg, truncate_prompt, prompt_weights)
        sched = self.make_scheduler(scheduler)
        # Timesteps stay on the CPU: the samplers read them as Python numbers (int(t)), which for a GPU
        # tensor would be a device sync per step and keep the CPU from queueing the next step early.
        sched.set_timesteps(steps)
        latents = latents * sched.init_noise_sigma
        decode.prepare(self, shape, output, tiled_decode)
        latents = denoise(self, sched, list(sched.timesteps), latents, emb, guidance_scale, generator, callback)
        return decode.finish(self, latents, output, tiled_decode)

    @torch.inference_mode()
    def img2img(
        self,
        prompt: str | Sequence[str],
        image: Any,
        strength: float = 0.8,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        scheduler: str | None = "pndm",
        num_images: int = 1,
        callback: StepCallback | None = None,
        output: str = "pil",
        tiled_decode: bool | None = None,
        truncate_prompt: bool = False,
        prompt_weights: bool = False,
    ) -> list[Any] | torch.Tensor:
        """Repaint ``image`` (PIL image, or a [3, H, W] / [B, 3, H, W] float tensor in [0, 1]).

        As diffusers' StableDiffusionImg2ImgPipeline: the image goes through the VAE encoder (a
        posterior sample), is noised to the timestep where ``strength`` of the schedule is left, and
        denoised over the remaining int(steps * strength) steps. PIL images are cut down to a
        multiple of 8 per side (Lanczos resize), as diffusers does.
        """
        prompts = prompts_list(prompt)
        negatives = negatives_list(negative_prompt, len(prompts))
        scheduler = scheduler or self.components.default_scheduler
        check_common(steps, guidance_scale, num_images, scheduler, output)
        check_seed(seed)
        check_strength(steps, strength)
        pixels = preprocess_image(image, self.size_multiple)  # [B, 3, H, W] in [-1, 1]
        n = len(prompts) * num_images
        if n % pixels.shape[0]:
            raise ValueError(f"cannot spread {pixels.shape[0]} images over {n} outputs")

        generator = self._generator(seed, need_seed=True)
        cfg = guidance_scale > 1.0
        emb = self.text_embeddings(prompts, negatives, num_images, cfg, truncate_prompt, prompt_weights)
        sched = self.make_scheduler(scheduler)
        timesteps, _ = sched.timesteps_for_strength(steps, strength)  # on the CPU: no sync per step
        timesteps = list(timesteps)

        init = self.encode_image(pixels, generator)  # posterior sample first, as diffusers draws it
        init = torch.cat([init] * (n // init.shape[0]), dim=0)
        noise = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(self.device, self.latent_dtype)
        t0 = torch.as_tensor(timesteps[0], device=self.device).reshape(1).expand(n)
        latents = sched.add_noise(init, noise, t0)
        decode.prepare(self, tuple(latents.shape), output, tiled_decode)
        latents = denoise(self, sched, timesteps, latents, emb, guidance_scale, generator, callback)
        return decode.finish(self, latents, output, tiled_decode)

    # -- internals -------------------------------------------------------------------------------

    def _generator(self, seed: int | None, need_seed: bool) -> torch.Generator:
        if seed is None and need_seed:
            seed = int(torch.randint(0, 2**32, (1,)).item())  # from torch's global RNG (manual_seed works)
        self.last_seed = seed
        g = torch.Generator("cpu")
        if seed is not None:
            g.manual_seed(seed)
        return g
