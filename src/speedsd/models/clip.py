"""CLIP text encoder (the text tower Stable Diffusion conditions on).

A pre-LayerNorm causal transformer over 77 tokens. Parameter names equal the keys of a transformers
``CLIPTextModel`` state dict (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.q_proj.weight`` ...), so a checkpoint's ``text_encoder``
loads strictly with no renaming. Loading is tolerant in two ways (a pre-hook, so ``strict=True`` still
holds for everything else): older checkpoints carry the constant buffer
``text_model.embeddings.position_ids``, which this module does not have and drops (see
:data:`IGNORED_KEYS`); and transformers >= 5 keeps no ``text_model.`` level in a ``CLIPTextModel``'s
own state dict (``embeddings.token_embedding.weight`` ...), which is added back.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick-GELU); SD 2.x uses OpenCLIP ViT-H, stored by
diffusers with its last layer removed, so that the output here (after ``final_layer_norm``) is the
penultimate-layer representation SD 2 was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speedsd import ops
from speedsd.models.layers import LayerNorm

# transformers' hidden_act names -> ops.gelu_op's ``approximate``.
_ACTIVATIONS = {"quick_gelu": "quick", "gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

# Keys some checkpoints hold that carry no learned state here (position ids are arange(77)).
IGNORED_KEYS = ("text_model.embeddings.position_ids",)
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


@dataclass(frozen=True)
class CLIPTextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"  # "quick_gelu" (SD 1.x, OpenAI) | "gelu" (SD 2.x, OpenCLIP)
    vocab_size: int = 49408
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406  # <|startoftext|>
    eos_token_id: int = 49407  # <|endoftext|>; pooled_output reads the first one in each row
    pad_token_id: int = 49407  # the SD 1.x tokenizer pads with EOS, SD 2.x's with 0 ("!")

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``text_encoder/config.json`` (a CLIPTextConfig dict).

        Token ids are taken from the tokenizer's vocabulary, not from the config: SD checkpoints
        store the placeholder ids bos=0, eos=2, pad=1 there. A ``CLIPTextModelWithProjection``
        config (SDXL's second encoder) is accepted; the projection itself is not part of this model.
        """
        cfg = dict(cfg)
        if "text_config" in cfg:  # a full CLIPConfig: take its text tower
            cfg = dict(cfg["text_config"])
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} in CLIP text config")
        pad = 0 if act != "quick_gelu" else 49407
        return cls(
            hidden_size=int(cfg.get("hidden_size", 512)),
            intermediate_size=int(cfg.get("intermediate_size", 2048)),
            num_layers=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 8)),
            hidden_act=act,
            vocab_size=int(cfg.get("vocab_size", 49408)),
            max_positions=int(cfg.get("max_position_embeddings", 77)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            pad_token_id=pad,
        )


CLIP_PRESETS: dict[str, CLIPTextConfig] = {
    # A stand-in for smoke tests and the CPU bench (random:tiny)
    "tiny": CLIPTextConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, hidden_act="quick_gelu"),
    # OpenAI CLIP ViT-L/14 text tower (SD 1.x).
    "sd1": CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, hidden_act="quick_gelu"
    ),
    # OpenCLIP ViT-H/14 text tower as diffusers stores it for SD 2.x: 23 of its 24 layers.
    "sd2": CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu", pad_token_id=0
    ),
}


def _embedding(n: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its N(0, 1) init (the loader fills every weight). On the meta device that
    init runs torch's Python decomposition of normal_, whose first use imports torch._dynamo: ~2-3 s of
    a cold start."""
    weight = torch.empty(n, dim, device=torch.get_default_device())
    return nn.Embedding(n, dim, _weight=weight)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        # [B, N, C] + [N, C]: positions are 0..N-1, no position_ids buffer needed.
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, H, N, D]
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for p in projs)
        out = causal_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # [B, H, N, D] -> [B, N, C]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d + causal mask) v for q, k, v [B, H, N, D].

    The dispatch's attention kernels take no mask, and 77 tokens is too small to matter, so this runs
    SDPA (``is_causal``) under every attention flag except "math", where it materializes the masked
    fp32 softmax (the paper-style baseline).
    """
    if ops.current().attention != "math":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    n = q.shape[-2]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, N, N]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal
    p = s.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(p.to(v.dtype), v)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.approximate = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.gelu_op(self.fc1(x), self.approximate))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """``forward(input_ids [B, N<=77]) -> [B, N, hidden]``: the last hidden state after
    ``final_layer_norm``, which SD pipelines feed the UNet as ``encoder_hidden_states``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self._register_load_state_dict_pre_hook(_normalize_keys)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input_ids must be [B, N<={self.config.max_positions}], got {tuple(input_ids.shape)}")
        return self.text_model(input_ids)

    def pooled_output(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, C]: the hidden state at each row's first EOS token (no projection)."""
        eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # first EOS, 0 if none
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]


def _normalize_keys(state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object) -> None:
    """load_state_dict pre-hook: drop :data:`IGNORED_KEYS`; add the ``text_model.`` level that
    transformers >= 5 leaves out of an in-memory (and newly saved) CLIPTextModel state dict."""
    for key in IGNORED_KEYS:
        state_dict.pop(prefix + key, None)
        state_dict.pop(prefix + key.removeprefix("text_model."), None)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
            state_dict[prefix + "text_model." + rest] = state_dict.pop(key)
