"""Tiny random SD checkpoints on disk, for the loader, pipeline and CLI tests (no network).

    folder = make_diffusers_folder(tmp_path, kind="sd1")                 # model_index.json, unet/, ...
    ckpt = make_single_file(tmp_path, kind="sd2", fmt="safetensors")     # original (LDM) layout + tokenizer/
    refs = reference_state_dicts("sd1")   # {"unet", "vae", "text_encoder"}: what both files hold

The weights come from diffusers/transformers modules built from tiny configs (``tiny_configs``) and
filled with seeded random values (norm weights included, so a swapped tensor is caught). The original
single-file layout is written by :func:`to_original`, this file's own diffusers -> LDM renaming
(tests/test_convert_original.py checks it against diffusers' converters). Tokenizer files are a tiny
valid byte-level BPE vocabulary (:func:`make_tokenizer_files`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]


def _byte_chars() -> list[str]:
    """The 256 byte-level symbols in CLIP's vocabulary order (printable bytes first: "!" is id 0)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def tokenizer_vocab() -> dict[str, int]:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


TOKENIZER_VOCAB_SIZE = len(tokenizer_vocab())  # 521


def make_tokenizer_files(directory: str | Path, pad_token: str | None = None) -> Path:
    """Write vocab.json + merges.txt (and, with ``pad_token``, special_tokens_map.json +
    tokenizer_config.json naming it, as SD 2.x's tokenizer folder does with "!")."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(tokenizer_vocab()))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    if pad_token is not None:
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
        (d / "special_tokens_map.json").write_text(json.dumps(special))
        (d / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77}))
    return d


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def tiny_configs(kind: str = "sd1", prediction_type: str | None = None) -> dict[str, dict[str, Any]]:
    """diffusers/transformers config dicts of a tiny model of family ``kind`` ("sd1" | "sd2").

    Heads follow the rules a single file's loader must assume (SD 1.x: 8 per UNet block; SD 2.x and
    CLIP: head dim 64, at least one head), so the folder and the single file build the same model.
    """
    sd2 = kind == "sd2"
    pred = prediction_type or ("v_prediction" if sd2 else "epsilon")
    hidden = 32
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": hidden,
        "attention_head_dim": [1, 1, 1] if sd2 else 8,
        "use_linear_projection": sd2,
        "upcast_attention": sd2 and pred == "v_prediction",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 16,
        "scaling_factor": 0.18215,
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "vocab_size": TOKENIZER_VOCAB_SIZE,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": TOKENIZER_VOCAB_SIZE - 2,
        "eos_token_id": TOKENIZER_VOCAB_SIZE - 1,
        "pad_token_id": 0 if sd2 else TOKENIZER_VOCAB_SIZE - 1,
    }
    sched = {**SD_SCHEDULER, "prediction_type": pred}
    if sd2 and pred == "v_prediction":
        sched["_class_name"] = "DDIMScheduler"
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}


# The real SD-1.4 configs (CompVis/stable-diffusion-v1-4 on the hub), for the full-geometry test.
SD14_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    },
    "scheduler": {**SD_SCHEDULER, "prediction_type": "epsilon"},
}


# SD 2.1 (768, v-prediction; stabilityai/stable-diffusion-2-1): what differs from SD 1.4.
SD21_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        **SD14_CONFIGS["unet"],
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 96,
    },
    "vae": {**SD14_CONFIGS["vae"], "sample_size": 768},
    "text_encoder": {
        **SD14_CONFIGS["text_encoder"],
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    },
    "scheduler": {**SD_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
}


def model_index(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# ---------------------------------------------------------------------------------------------
# reference weights
# ---------------------------------------------------------------------------------------------


def diffusers_modules(configs: dict[str, dict[str, Any]], device: str | torch.device = "cpu") -> dict[str, Any]:
    """diffusers UNet2DConditionModel / AutoencoderKL and transformers CLIPTextModel (default init)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    with torch.device(device):
        text_cfg = transformers.CLIPTextConfig(
            **{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
        )
        return {
            "unet": UNet2DConditionModel(**kwargs(configs["unet"])),
            "vae": AutoencoderKL(**kwargs(configs["vae"])),
            "text_encoder": transformers.CLIPTextModel(text_cfg),
        }


def _randomize(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded values for every float tensor: N(0.1, 0.2^2), so nothing is 0/1 and swaps show."""
    return {
        k: (torch.randn(v.shape, generator=gen) * 0.2 + 0.1) if v.is_floating_point() else v.clone()
        for k, v in sd.items()
    }


@functools.lru_cache(maxsize=8)
def _reference(kind: str, seed: int, prediction_type: str | None) -> dict[str, dict[str, torch.Tensor]]:
    mods = diffusers_modules(tiny_configs(kind, prediction_type))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        sd = {k: v for k, v in mods[comp].state_dict().items() if not k.endswith("position_ids")}
        if comp == "text_encoder":  # transformers 5 drops the "text_model." level hub files have
            sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
        out[comp] = _randomize(sd, gen)
    return out


def reference_state_dicts(
    kind: str = "sd1", seed: int = 0, prediction_type: str | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers-layout fp32 state dicts {"unet", "vae", "text_encoder"} both file layouts hold
    (``text_model.embeddings.position_ids`` left out). Cached: do not modify the tensors."""
    return _reference(kind, seed, prediction_type)


# ---------------------------------------------------------------------------------------------
# diffusers -> original (LDM) layout, this file's own renaming
# ---------------------------------------------------------------------------------------------

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]


def _unet_key(k: str, cfg: dict[str, Any]) -> str:
    per = cfg["layers_per_block"] + 1  # input/output blocks per level (resnets + resampler slot)
    up_attn = [t == "CrossAttnUpBlock2D" for t in cfg["up_block_types"]]
    simple = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for a, b in simple.items():
        if k.startswith(a):
            return b + k[len(a) :]

    def resnet(rest: str) -> str:
        for a, b in _RESNET:
            if rest.startswith(a + "."):
                return b + rest[len(a) :]
        raise KeyError(rest)

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", k):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        u = int(m[1])
        return f"output_blocks.{u * per + per - 1}.{2 if up_attn[u] else 1}.conv.{m[2]}"
    raise KeyError(k)


def _vae_item(k: str, v: torch.Tensor, n: int) -> tuple[str, torch.Tensor]:
    k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k2)
    k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
    k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k2)
    k2 = re.sub(
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k2
    )
    k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k2)
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", k
    ):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        if name != "norm" and m[3] == "weight":
            v = v[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        k2 = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    return k2, v


def _openclip(sd: dict[str, torch.Tensor], extra_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj"}
    names |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = [
        {k.split(".", 4)[4]: v for k, v in sd.items() if k.startswith(f"text_model.encoder.layers.{i}.")}
        for i in range(n)
    ]
    for i, layer in enumerate([*layers, extra_layer]):
        b = f"{p}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [layer[f"self_attn.{x}_proj.{param}"] for x in "qkv"]
            out[b + f"attn.in_proj_{param}"] = torch.cat(qkv)  # [3C, ...]
            for a, o in names.items():
                out[b + f"{o}.{param}"] = layer[f"{a}.{param}"]
    return out


def to_original(
    refs: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict[str, Any]], kind: str, extras: bool = True
) -> dict[str, torch.Tensor]:
    """The original single-file dict of diffusers-layout ``refs``.

    With ``extras`` it also holds what real files carry and the loader must skip: DDPM buffers, an EMA
    copy of two UNet tensors, the CLIP position_ids (SD 1.x), or OpenCLIP's extra last resblock,
    text_projection and logit_scale (SD 2.x). Without extras (SD 2.x), the extra resblock is still
    written: it is part of every SD 2.x file.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in refs["unet"].items():
        out["model.diffusion_model." + _unet_key(k, configs["unet"])] = v
    n = len(configs["vae"]["block_out_channels"])
    for k, v in refs["vae"].items():
        k2, v2 = _vae_item(k, v, n)
        out["first_stage_model." + k2] = v2
    text = refs["text_encoder"]
    gen = torch.Generator().manual_seed(1234)
    if kind == "sd1":
        for k, v in text.items():
            out["cond_stage_model.transformer." + k] = v
    else:
        layer0 = {k.split(".", 4)[4]: v for k, v in text.items() if k.startswith("text_model.encoder.layers.0.")}
        extra = {k: torch.randn(v.shape, generator=gen) for k, v in layer0.items()}
        out |= _openclip(text, extra)
    if extras:
        hidden = configs["text_encoder"]["hidden_size"]
        out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
        out["betas"] = torch.linspace(0.00085, 0.012, 1000)
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        out["model_ema.diffusion_modelout2bias"] = torch.randn(4, generator=gen)
        out["model_ema.diffusion_modelinput_blocks00bias"] = torch.randn(
            out["model.diffusion_model.input_blocks.0.0.bias"].shape, generator=gen
        )
        if kind == "sd1":
            out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        else:
            out["cond_stage_model.model.text_projection"] = torch.randn(hidden, hidden, generator=gen)
            out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    return out


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _save(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


def make_diffusers_folder(
    tmp_path: str | Path,
    kind: str = "sd1",
    fmt: str = "safetensors",
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    prediction_type: str | None = None,
    name: str | None = None,
    tokenizer: bool = True,
    text_model_prefix: bool = True,
) -> Path:
    """A diffusers folder of the tiny ``kind`` model; weights = ``reference_state_dicts(kind, seed)``.

    fmt "safetensors" | "bin"; variant None | "fp16" (file names ``*.fp16.*``); the SD 1.x text
    encoder file also holds the old ``position_ids`` buffer, as hub files do. ``text_model_prefix=False``
    writes the text encoder's keys as transformers 5's save_pretrained does (no ``text_model.``).
    """
    configs = tiny_configs(kind, prediction_type)
    refs = reference_state_dicts(kind, seed, prediction_type)
    root = Path(tmp_path) / (name or f"tiny-{kind}-{fmt}{'-' + variant if variant else ''}")
    suffix = (f".{variant}" if variant else "") + (".safetensors" if fmt == "safetensors" else ".bin")
    files = {
        "unet": "diffusion_pytorch_model",
        "vae": "diffusion_pytorch_model",
        "text_encoder": "model" if fmt == "safetensors" else "pytorch_model",
    }
    for comp, stem in files.items():
        (root / comp).mkdir(parents=True, exist_ok=True)
        (root / comp / "config.json").write_text(json.dumps(configs[comp]))
        sd = {k: v.to(dtype) for k, v in refs[comp].items()}
        if comp == "text_encoder" and kind == "sd1":
            sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        if comp == "text_encoder" and not text_model_prefix:
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        _save(sd, root / comp / (stem + suffix), fmt)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    (root / "model_index.json").write_text(json.dumps(model_index(configs)))
    if tokenizer:
        make_tokenizer_files(root / "tokenizer", pad_token="!" if kind == "sd2" else EOS)
    return root


def make_single_file(
    tmp_path: str | Path,
    kind: str = "sd1",
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    name: str | None = None,
    tokenizer: bool = True,
    wrap: bool = True,
    extras: bool = True,
    prediction_type: str | None = None,
) -> Path:
    """An original-layout single file of the tiny ``kind`` model (weights = ``reference_state_dicts``).

    fmt "safetensors" | "ckpt" (a ``{"state_dict": ..., "global_step": ...}`` dict when ``wrap``).
    With ``tokenizer`` a ``tokenizer/`` folder is written beside it. The file lives in its own folder
    ``tmp_path/<name stem>/`` so tokenizer lookups of different tests do not mix.
    """
    configs = tiny_configs(kind, prediction_type)
    refs = reference_state_dicts(kind, seed, prediction_type)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_original(refs, configs, kind, extras).items()}
    fname = name or f"tiny-{kind}.{fmt}"
    folder = Path(tmp_path) / Path(fname).stem
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fname
    if fmt == "safetensors":
        _save(sd, path, "safetensors")
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6} if wrap else sd, path)
    if tokenizer:
        make_tokenizer_files(folder / "tokenizer")
    return path
