"""The peers, timed on the same weights in the same run: diffusers eager (SDPA) and diffusers +
torch.compile(mode="reduce-overhead") with channels-last; and the fidelity check against diffusers fp32.

diffusers is an optional dependency here: without it these return empty results.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from speedsd.bench import common


def _vae_kwargs(cfg: Any) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    )


def _clip_kwargs(cfg: Any) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        hidden_act=cfg.hidden_act,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_positions,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


def _diffusers_models(pipe: Any, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """diffusers UNet/VAE and transformers CLIP built from our configs and loaded with our weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    c = pipe.components
    unet = UNet2DConditionModel(**c.unet.config.to_diffusers())
    unet.load_state_dict(c.unet.state_dict(), strict=True)
    vae = AutoencoderKL(**_vae_kwargs(c.vae.config))
    vae.load_state_dict(c.vae.state_dict(), strict=True)
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(**_clip_kwargs(c.text_encoder.config)))
    ours = c.text_encoder.state_dict()
    theirs = text.state_dict()
    # transformers >= 5 drops the "text_model." level from CLIPTextModel's own keys
    strip = not any(k.startswith("text_model.") for k in theirs)
    sd = {(k.removeprefix("text_model.") if strip else k): v for k, v in ours.items()}
    text.load_state_dict(sd, strict=False)
    missing = set(theirs) - set(sd) - {k for k in theirs if k.endswith("position_ids")}
    if missing:
        raise RuntimeError(f"transformers CLIP keys not filled from speedsd weights: {sorted(missing)[:5]}")
    return unet.to(pipe.device, dtype).eval(), vae.to(pipe.device, dtype).eval(), text.to(pipe.device, dtype).eval()


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
        if dev.type == "cuda":
            row["unet_step_b2b_ms"] = common.back_to_back_ms(lambda: unet(x, t, ctx).sample, calls=5, runs=3)
            row["vae_decode_b2b_ms"] = common.back_to_back_ms(lambda: vae.decode(z).sample, calls=5, runs=3)
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
            row["unet_step_b2b_ms"] = common.back_to_back_ms(lambda: cu(x, t, ctx).sample, calls=steps)
            row["vae_decode_b2b_ms"] = common.back_to_back_ms(lambda: cv(z).sample, calls=5, runs=5)
            rows.append(row)
            print(row, flush=True)
    return rows


def _compare(img: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Images in [0, 1]: max abs error and PSNR."""
    d = (img.double() - ref.double()).abs()
    mse = float((d**2).mean())
    saturated = float(((ref <= 0) | (ref >= 1)).double().mean())  # clipped pixels compare trivially
    return {
        "max_abs": float(d.max()),
        "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "ref_saturated_frac": saturated,
    }


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
            emb = text(ids.to(dev))[0]
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
    import dataclasses

    import diffusers

    cfg = {**dataclasses.asdict(pipe.components.scheduler_config), "skip_prk_steps": True}
    cls = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[name]
    return getattr(diffusers, cls).from_config(cfg)
