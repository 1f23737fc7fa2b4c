"""The peers, timed on the same weights in the same run: diffusers eager (SDPA) and diffusers +
torch.compile(mode="reduce-overhead") with channels-last; and the fidelity check against diffusers fp32.

diffusers is an optional dependency here: without it these return empty results.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from speedsd import ops
from speedsd.bench import common


def _diffusers_models(pipe: Any, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """diffusers UNet/VAE and transformers CLIP built from our configs and loaded with our weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    c = pipe.components
    unet = UNet2DConditionModel(**c.unet.config.to_diffusers())
    unet.load_state_dict(c.unet.state_dict(), strict=True)
    vae = AutoencoderKL(**c.vae.config.to_diffusers())
    vae.load_state_dict(c.vae.state_dict(), strict=True)
    text = None
    try:
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextModel(CLIPTextConfig(**c.text_encoder.config.to_transformers()))
        sd = c.text_encoder.state_dict()
        text.load_state_dict(sd, strict=False)
        text = text.to(pipe.device, dtype).eval()
    except Exception as e:  # transformers missing or config mismatch: fidelity falls back to our encoder
        print(f"peers: transformers CLIP unavailable ({e}); using speedsd's text encoder for both")
    return unet.to(pipe.device, dtype).eval(), vae.to(pipe.device, dtype).eval(), text


def peer_rows(pipe: Any, steps: int, size: int, reps: int) -> list[dict[str, Any]]:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return [{"peer": "diffusers", "skipped": "not installed"}]
    from diffusers.models.attention_processor import AttnProcessor2_0

    h = size // 8
    dev, dt = pipe.device, pipe.dtype
    unet, vae, _ = _diffusers_models(pipe, dt)
    ctx = torch.randn(2, 77, pipe.components.unet.config.cross_attention_dim, device=dev, dtype=dt)
    x = torch.randn(2, 4, h, h, device=dev, dtype=dt)
    z = torch.randn(1, 4, h, h, device=dev, dtype=dt)
    t = torch.tensor(500.0, device=dev)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
        row: dict[str, Any] = {"peer": "diffusers eager (SDPA)"}
        row["unet_step_ms"] = common.median_ms(lambda: unet(x, t, ctx).sample, rep=reps)
        row["vae_decode_ms"] = common.median_ms(lambda: vae.decode(z).sample, rep=reps)
        rows.append(row)
        print(row, flush=True)
        if dev.type == "cuda":
            unet_cl = unet.to(memory_format=torch.channels_last)
            vae_cl = vae.to(memory_format=torch.channels_last)
            cu = torch.compile(unet_cl, mode="reduce-overhead")
            cv = torch.compile(vae_cl.decode, mode="reduce-overhead")
            row = {"peer": "diffusers + torch.compile(reduce-overhead), channels-last"}
            t0 = time.perf_counter()
            cu(x, t, ctx)
            torch.cuda.synchronize()
            first_unet = time.perf_counter() - t0
            t0 = time.perf_counter()
            cv(z)
            torch.cuda.synchronize()
            row["first_call_s"] = first_unet + time.perf_counter() - t0
            row["unet_step_ms"] = common.median_ms(lambda: cu(x, t, ctx).sample, warmup=5, rep=reps)
            row["vae_decode_ms"] = common.median_ms(lambda: cv(z).sample, warmup=3, rep=reps)
            rows.append(row)
            print(row, flush=True)
    return rows


def _compare(img: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Images in [0, 1]: max abs error and PSNR."""
    d = (img.double() - ref.double()).abs()
    mse = float((d**2).mean())
    return {"max_abs": float(d.max()), "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")}


def fidelity(pipe: Any, steps: int, size: int, scheduler: str = "pndm") -> dict[str, Any]:
    """Optimized fp16 image vs diffusers fp32, next to diffusers fp16 vs diffusers fp32.

    Same weights, same text embedding input ids, same initial latents, same scheduler config.
    """
    try:
        from diffusers import PNDMScheduler, StableDiffusionPipeline  # noqa: F401
    except ImportError:
        return {"skipped": "diffusers not installed"}
    dev = pipe.device
    if dev.type != "cuda":
        return {"skipped": "needs CUDA (fp16)"}
    prompt = "a photograph of an astronaut riding a horse"
    h = size // 8
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 4, h, h, generator=g)
    ids = pipe.components.tokenizer([prompt, ""])

    def diffusers_image(dtype: torch.dtype) -> torch.Tensor:
        from diffusers import StableDiffusionPipeline

        unet, vae, text = _diffusers_models(pipe, dtype)
        with torch.inference_mode():
            if text is not None:
                emb = text(ids.to(dev))[0]
            else:
                with ops.using(ops.PRESETS["reference"]):
                    emb = pipe.components.text_encoder.to(dtype)(ids.to(dev))
                    pipe.components.text_encoder.to(pipe.dtype)
            sched = _diffusers_scheduler(pipe, scheduler)
            sd = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text,
                tokenizer=None,
                unet=unet,
                scheduler=sched,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            out = sd(
                prompt_embeds=emb[:1],
                negative_prompt_embeds=emb[1:],
                num_inference_steps=steps,
                guidance_scale=7.5,
                latents=latents.to(dev, dtype),
                output_type="pt",
                height=size,
                width=size,
            ).images
        del sd, unet, vae, text
        torch.cuda.empty_cache()
        return out.float().clamp(0, 1)

    ref32 = diffusers_image(torch.float32)
    ref16 = diffusers_image(torch.float16)
    ours = pipe(prompt, steps=steps, height=size, width=size, latents=latents, scheduler=scheduler, output="tensor")
    ours = ours.float().clamp(0, 1)
    res = {
        "speedsd fp16 (optimized) vs diffusers fp32": _compare(ours, ref32),
        "diffusers fp16 vs diffusers fp32": _compare(ref16, ref32),
    }
    res["ratio_max_abs"] = res["speedsd fp16 (optimized) vs diffusers fp32"]["max_abs"] / max(
        res["diffusers fp16 vs diffusers fp32"]["max_abs"], 1e-12
    )
    return res


def _diffusers_scheduler(pipe: Any, name: str) -> Any:
    import diffusers

    cfg = pipe.components.scheduler_config.to_diffusers()
    cls = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[name]
    return getattr(diffusers, cls).from_config(cfg)
