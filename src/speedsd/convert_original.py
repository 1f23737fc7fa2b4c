"""Original (CompVis / Stability, "LDM") single-file key layout -> diffusers key layout.

A single-file SD checkpoint holds the whole LatentDiffusion module:

    model.diffusion_model.*            UNet          (input_blocks / middle_block / output_blocks)
    first_stage_model.*                VAE           (encoder.down.N.block.M, mid.attn_1.q as 1x1 conv)
    cond_stage_model.transformer.*     SD 1.x text encoder (a transformers CLIPTextModel)
    cond_stage_model.model.*           SD 2.x text encoder (OpenCLIP: fused attn.in_proj_weight ...)

Our modules use diffusers/transformers names, so loading is a *plan*: for each key the module
expects (read from the module built on the meta device), :func:`source_for` names the file key it
comes from and the op that turns one into the other:

    ""         the tensor as stored
    "squeeze"  VAE attention q/k/v/proj_out stored as 1x1 convs [C, C, 1, 1] -> linear [C, C]
    "q"/"k"/"v"  one third (along dim 0) of OpenCLIP's fused in_proj_weight / in_proj_bias

Geometry that the weights fix (channels, depths, which levels attend, context width, vocabulary) is
read from tensor shapes by :func:`infer_configs`; what they cannot tell comes from the family: heads
(SD 1.x: 8 per UNet block; SD 2.x: head dim 64), CLIP heads (head dim 64), activations (SD 1.x
quick-GELU, SD 2.x GELU), 32 GroupNorm groups, VAE scaling factor 0.18215.

Keys that are known and deliberately not loaded (:func:`is_ignored`): the EMA copy ``model_ema.*``
(SD's released "ema" files already hold the EMA weights in ``model.diffusion_model``), the DDPM
schedule buffers (``betas``, ``alphas_cumprod`` ... -- the scheduler recomputes them), ``logvar``,
the VAE's training loss ``first_stage_model.loss.*``, CLIP's ``position_ids`` buffer, and for
OpenCLIP ``text_projection``, ``logit_scale``, any ``visual.*`` tower and the last resblock (SD 2.x
conditions on the penultimate layer, so diffusers stores, and we build, one layer fewer). Every other
key must be used, or loading fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x

# LatentDiffusion buffers (the DDPM schedule) and other tensors that carry nothing we use.
IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        CLIP_PREFIX + "text_model.embeddings.position_ids",
        CLIP_PREFIX + "embeddings.position_ids",
        OPENCLIP_PREFIX + "text_projection",
        OPENCLIP_PREFIX + "logit_scale",
        OPENCLIP_PREFIX + "attn_mask",
    }
)
IGNORED_PREFIXES = ("model_ema.", VAE_PREFIX + "loss.", OPENCLIP_PREFIX + "visual.")

Shapes = Mapping[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsupported or not matching the model."""


@dataclass(frozen=True)
class Source:
    """Where a module tensor comes from in an original checkpoint."""

    key: str
    op: str = ""  # "" | "squeeze" | "q" | "k" | "v"


# ---------------------------------------------------------------------------------------------
# Family detection and geometry
# ---------------------------------------------------------------------------------------------


def detect_family(shapes: Shapes) -> str:
    """ "sd1" (OpenAI CLIP text encoder) or "sd2" (OpenCLIP); CheckpointError for anything else."""
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError("unsupported architecture: SDXL-style checkpoint (conditioner.embedders.* keys)")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
            raise CheckpointError(
                "a single diffusers component, not a full Stable Diffusion checkpoint: pass the diffusers folder"
            )
        raise CheckpointError(
            f"not a Stable Diffusion 1.x/2.x checkpoint: no {UNET_PREFIX}* keys (first keys: {', '.join(keys[:3])})"
        )
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise CheckpointError("unsupported architecture: class/size-conditioned UNet (label_emb, e.g. SDXL)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise CheckpointError(f"not a Stable Diffusion UNet: no 4-D {UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in[1] != 4:
        raise CheckpointError(
            f"unsupported architecture: UNet with {conv_in[1]} input channels (e.g. an inpainting model); "
            "speedsd runs text-to-image UNets with 4 latent channels"
        )
    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in keys)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    if has_openclip and not has_clip:
        return "sd2"
    if has_clip and not has_openclip:
        return "sd1"
    if has_clip and has_openclip:
        raise CheckpointError("unsupported checkpoint: holds both an OpenAI CLIP and an OpenCLIP text encoder")
    raise CheckpointError("incomplete checkpoint: no text encoder (cond_stage_model.transformer.* or .model.*)")


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``prefix + "N." ...``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"incomplete checkpoint: missing {key}")
    return tuple(shapes[key])


def _per_level(values: list[Any]) -> Any:
    return values[0] if len(set(values)) == 1 else values


def _infer_unet(shapes: Shapes, family: str) -> dict[str, Any]:
    p = UNET_PREFIX
    c0, cin = _shape(shapes, p + "input_blocks.0.0.weight")[:2]
    levels: list[dict[str, Any]] = [{"ch": [], "attn": [], "depth": 0}]
    for k in _indices(shapes, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{k}.0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"ch": [], "attn": [], "depth": 0})
            continue
        lvl = levels[-1]
        lvl["ch"].append(_shape(shapes, p + f"input_blocks.{k}.0.out_layers.3.weight")[0])
        depth = len(_indices(shapes, p + f"input_blocks.{k}.1.transformer_blocks."))
        lvl["attn"].append(depth > 0)
        lvl["depth"] = max(lvl["depth"], depth)
    if any(not lvl["ch"] or len(set(lvl["ch"])) != 1 or len(set(lvl["attn"])) != 1 for lvl in levels):
        raise CheckpointError("unsupported UNet layout: irregular input_blocks (not an SD 1.x/2.x UNet)")
    channels = [lvl["ch"][0] for lvl in levels]
    attn = [lvl["attn"][0] for lvl in levels]
    mid = p + "middle_block.1."
    ctx = _shape(shapes, mid + "transformer_blocks.0.attn2.to_k.weight")[1]
    heads = [max(1, c // 64) for c in channels]  # SD 2.x: head dim 64 (SD 1.x: 8 heads, below)
    temb = _shape(shapes, p + "time_embed.0.weight")[0]
    depths = [lvl["depth"] for lvl in levels if lvl["depth"]] or [len(_indices(shapes, mid + "transformer_blocks."))]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": cin,
        "out_channels": _shape(shapes, p + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": _per_level([len(lvl["ch"]) for lvl in levels]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "transformer_layers_per_block": _per_level(depths),
        "cross_attention_dim": ctx,
        "attention_head_dim": heads if family == "sd2" else 8,  # diffusers writes SD 2.x heads as a list
        "use_linear_projection": len(_shape(shapes, mid + "proj_in.weight")) == 2,
        "upcast_attention": False,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }
    if temb != 4 * c0:
        cfg["time_embedding_dim"] = temb
    return cfg


def _infer_vae(shapes: Shapes) -> dict[str, Any]:
    p = VAE_PREFIX
    n = len(_indices(shapes, p + "encoder.down."))
    if n == 0:
        raise CheckpointError(f"incomplete checkpoint: no VAE ({p}encoder.down.* keys)")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(shapes, p + "decoder.conv_in.weight")[1],
        "block_out_channels": [_shape(shapes, p + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n)],
        "layers_per_block": len(_indices(shapes, p + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
        "sample_size": 512,
        "use_quant_conv": p + "quant_conv.weight" in shapes,
        "use_post_quant_conv": p + "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": p + "encoder.mid.attn_1.q.weight" in shapes,
    }


def clip_has_text_model_prefix(shapes: Shapes) -> bool:
    """Old SD 1.x files store the CLIP keys without transformers' ``text_model.`` level."""
    return any(k.startswith(CLIP_PREFIX + "text_model.") for k in shapes)


def _infer_text_encoder(shapes: Shapes, family: str) -> dict[str, Any]:
    if family == "sd1":
        p = CLIP_PREFIX + ("text_model." if clip_has_text_model_prefix(shapes) else "")
        vocab, hidden = _shape(shapes, p + "embeddings.token_embedding.weight")
        positions = _shape(shapes, p + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(shapes, p + "encoder.layers."))
        inter = _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0]
        act = "quick_gelu"
    else:
        p = OPENCLIP_PREFIX
        vocab, hidden = _shape(shapes, p + "token_embedding.weight")
        positions = _shape(shapes, p + "positional_embedding")[0]
        layers = len(_indices(shapes, p + "transformer.resblocks.")) - 1  # the last one is dropped
        if layers < 1:
            raise CheckpointError("unsupported OpenCLIP text encoder: fewer than 2 resblocks")
        inter = _shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        act = "gelu"
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "hidden_act": act,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "layer_norm_eps": 1e-5,
    }


def infer_configs(shapes: Shapes, family: str) -> dict[str, dict[str, Any]]:
    """diffusers/transformers-style config dicts {"unet", "vae", "text_encoder"} from tensor shapes."""
    return {
        "unet": _infer_unet(shapes, family),
        "vae": _infer_vae(shapes),
        "text_encoder": _infer_text_encoder(shapes, family),
    }


# ---------------------------------------------------------------------------------------------
# diffusers key -> original key
# ---------------------------------------------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _as_list(v: Any, n: int) -> list[int]:
    return [v] * n if isinstance(v, int) else list(v)


def _unet_source(dkey: str, cfg: Mapping[str, Any]) -> str:
    n = len(cfg["block_out_channels"])
    layers = _as_list(cfg["layers_per_block"], n)
    attn_up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    for d, o in _UNET_TOP.items():
        if dkey.startswith(d + "."):
            return o + dkey[len(d) :]
    parts = dkey.split(".")
    if parts[0] == "down_blocks":
        lvl, kind = int(parts[1]), parts[2]
        first = 1 + sum(layers[m] + 1 for m in range(lvl))  # input_blocks index of the level's first resnet
        if kind == "downsamplers":  # down_blocks.l.downsamplers.0.conv.* -> input_blocks.K.0.op.*
            return f"input_blocks.{first + layers[lvl]}.0.op." + ".".join(parts[5:])
        j, rest = int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"input_blocks.{first + j}.0." + _rename_resnet(rest)
        return f"input_blocks.{first + j}.1." + ".".join(rest)
    if parts[0] == "mid_block":
        j, rest = int(parts[2]), parts[3:]
        if parts[1] == "resnets":
            return f"middle_block.{2 * j}." + _rename_resnet(rest)
        return "middle_block.1." + ".".join(rest)
    if parts[0] == "up_blocks":
        lvl, kind = int(parts[1]), parts[2]
        up_layers = [x + 1 for x in reversed(layers)]
        first = sum(up_layers[:lvl])
        if kind == "upsamplers":  # after the level's last resnet (and its attention, if any)
            slot = 2 if attn_up[lvl] else 1
            return f"output_blocks.{first + up_layers[lvl] - 1}.{slot}.conv." + ".".join(parts[5:])
        j, rest = int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"output_blocks.{first + j}.0." + _rename_resnet(rest)
        return f"output_blocks.{first + j}.1." + ".".join(rest)
    return "?" + dkey  # not a key an SD UNet has: reported as missing


def _rename_resnet(rest: list[str]) -> str:
    name = rest[0]
    return ".".join([_UNET_RESNET.get(name, name), *rest[1:]])


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def _vae_source(dkey: str, n_levels: int) -> Source:
    side, rest = dkey.split(".", 1) if "." in dkey else ("", dkey)
    if side not in ("encoder", "decoder"):  # quant_conv / post_quant_conv
        return Source(dkey)
    parts = rest.split(".")
    if parts[0] in _VAE_TOP:
        return Source(f"{side}.{_VAE_TOP[parts[0]]}." + ".".join(parts[1:]))
    if parts[0] in ("down_blocks", "up_blocks"):
        i = int(parts[1])
        lvl = i if side == "encoder" else n_levels - 1 - i  # the decoder's up.N counts from the bottom
        name = "down" if side == "encoder" else "up"
        if parts[2] == "resnets":
            tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return Source(f"{side}.{name}.{lvl}.block.{parts[3]}.{tail}")
        sampler = "downsample" if side == "encoder" else "upsample"
        return Source(f"{side}.{name}.{lvl}.{sampler}." + ".".join(parts[4:]))
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            tail = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
            return Source(f"{side}.mid.block_{int(parts[2]) + 1}.{tail}")
        tail = ".".join(parts[3:])  # mid_block.attentions.0.<tail>
        for d, o in _VAE_ATTN.items():
            if tail.startswith(d + "."):
                param = tail[len(d) + 1 :]
                op = "squeeze" if d != "group_norm" and param == "weight" else ""
                return Source(f"{side}.mid.attn_1.{o}.{param}", op)
    return Source(dkey)


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _openclip_source(dkey: str) -> Source:
    if dkey in _OPENCLIP_TOP:
        return Source(OPENCLIP_PREFIX + _OPENCLIP_TOP[dkey])
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", dkey)
    if not m:
        return Source("?" + dkey)
    i, mod, param = m.groups()
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{i}."
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj", mod)
    if qkv:  # one third of the fused [3C, C] in_proj
        return Source(block + f"attn.in_proj_{param}", qkv.group(1))
    return Source(block + f"{_OPENCLIP_LAYER.get(mod, mod)}.{param}")


def source_for(
    component: str, dkey: str, family: str, configs: Mapping[str, Mapping[str, Any]], shapes: Shapes
) -> Source:
    """The original-checkpoint source of diffusers key ``dkey`` of ``component``."""
    if component == "unet":
        return Source(UNET_PREFIX + _unet_source(dkey, configs["unet"]))
    if component == "vae":
        src = _vae_source(dkey, len(configs["vae"]["block_out_channels"]))
        return Source(VAE_PREFIX + src.key, src.op)
    if family == "sd2":
        return _openclip_source(dkey)
    if clip_has_text_model_prefix(shapes):
        return Source(CLIP_PREFIX + dkey)
    return Source(CLIP_PREFIX + dkey.removeprefix("text_model."))


def is_ignored(key: str, family: str, text_layers: int) -> bool:
    """True for the known extra keys that are deliberately not loaded (see the module docstring)."""
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return True
    # SD 2.x: the last OpenCLIP resblock (index == the number of layers we build) is unused.
    return family == "sd2" and key.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.{text_layers}.")


def shape_matches(op: str, stored: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Whether a stored tensor of shape ``stored`` yields ``wanted`` through ``op``."""
    if op == "":
        return stored == wanted
    if op == "squeeze":  # [C, C, 1, 1] / [C, C, 1] conv weights, or already-linear [C, C]
        return stored[:2] == wanted and all(s == 1 for s in stored[2:])
    return stored == (3 * wanted[0], *wanted[1:])  # "q" / "k" / "v"


def materialize(src: Source, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read ``src`` through ``get(key)`` and apply its op."""
    t = get(src.key)
    if src.op == "squeeze":
        return t.reshape(t.shape[0], t.shape[1])  # [C, C, 1, 1] -> [C, C]
    if src.op in ("q", "k", "v"):
        return t.chunk(3, dim=0)["qkv".index(src.op)]  # [3C, ...] -> [C, ...]
    return t
