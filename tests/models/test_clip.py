"""CLIP text encoder vs transformers' CLIPTextModel, same weights, fp32 on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from speedsd import ops
from speedsd.models.clip import CLIP_PRESETS, CLIPTextConfig, CLIPTextModel

VOCAB, BOS, EOS = 1000, 998, 999

# text_encoder/config.json of SD 1.4 (OpenAI ViT-L/14) and SD 2.x (OpenCLIP ViT-H, 23 layers).
SD14_TEXT = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD2_TEXT = {
    **SD14_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _tiny_pair(act: str, attn_impl: str = "eager") -> tuple[transformers.CLIPTextModel, CLIPTextModel]:
    """A tiny transformers CLIP text model with O(1)-scale random weights (so attention is far from
    uniform and LayerNorm affines are not identity), and ours loaded strictly from its state dict."""
    tc = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attn_implementation=attn_impl,
    )
    ref = transformers.CLIPTextModel(tc).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn_like(p) * 0.8 + 0.1)
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5 * 1.5)
            else:  # biases and LayerNorm affines
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0.1))
    cfg = dataclasses.replace(CLIPTextConfig.from_transformers(tc.to_dict()), eos_token_id=EOS, bos_token_id=BOS)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _ids(batch: int = 3, n: int = 77, pad: int = EOS) -> torch.Tensor:
    """BOS, random tokens, EOS at different places, then padding (EOS for SD 1.x, 0 for SD 2.x)."""
    ids = torch.randint(0, BOS, (batch, n))
    ids[:, 0] = BOS
    ends = [5, n // 2, n - 1][:batch]
    for row, end in enumerate(ends):
        ids[row, end] = EOS
        ids[row, end + 1 :] = pad
    return ids


@pytest.mark.parametrize("act, pad", [("quick_gelu", EOS), ("gelu", 0)], ids=["sd1-quick_gelu", "sd2-gelu"])
@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("n", [77, 20], ids=["77tok", "20tok"])
def test_matches_transformers(act: str, pad: int, attention: str, n: int) -> None:
    ref, ours = _tiny_pair(act)
    ids = _ids(n=n, pad=pad)
    with torch.no_grad():
        out_ref = ref(input_ids=ids)
        with ops.using(ops.Flags(attention=attention)):
            hidden = ours(ids)
    assert hidden.shape == (3, n, 64)
    assert _rel_err(hidden, out_ref.last_hidden_state) <= 1e-4
    # pooled output = hidden state at each row's first EOS (transformers' rule for a real eos id)
    assert _rel_err(ours.pooled_output(hidden, ids), out_ref.pooler_output) <= 1e-4


def test_activation_matters() -> None:
    """The two activations give clearly different outputs, so the parity tests above can tell them apart."""
    ref, ours = _tiny_pair("gelu")
    ids = _ids()
    quick = CLIPTextModel(dataclasses.replace(ours.config, hidden_act="quick_gelu")).eval()
    quick.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert _rel_err(quick(ids), ref(input_ids=ids).last_hidden_state) > 1e-3  # 10x the parity tolerance


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_causal(attention: str) -> None:
    """Changing the tokens after position k leaves positions 0..k unchanged, and changes the rest."""
    _, ours = _tiny_pair("quick_gelu")
    ids = _ids(batch=2)
    k = 30
    other = ids.clone()
    other[:, k + 1 :] = torch.randint(0, BOS, (2, 77 - k - 1))
    with torch.no_grad(), ops.using(ops.Flags(attention=attention)):
        a, b = ours(ids), ours(other)
    torch.testing.assert_close(a[:, : k + 1], b[:, : k + 1], rtol=1e-5, atol=1e-5)
    assert (a[:, k + 1 :] - b[:, k + 1 :]).abs().amax(dim=-1).min() > 1e-3


def test_state_dict_key_styles() -> None:
    """Hub checkpoints: ``text_model.`` keys, some with the position_ids buffer; transformers >= 5 in
    memory: no ``text_model.`` level. All load strictly and give identical weights."""
    ref, ours = _tiny_pair("quick_gelu")
    sd = ref.state_dict()
    hub = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    old = {**hub, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    own = ours.state_dict()
    assert set(own) == set(hub)
    for variant in (sd, hub, old):
        fresh = CLIPTextModel(ours.config)
        fresh.load_state_dict(variant, strict=True)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, own[k]), k
    with pytest.raises(RuntimeError, match="Missing key"):
        CLIPTextModel(ours.config).load_state_dict({k: v for k, v in hub.items() if "fc2" not in k})


@pytest.mark.parametrize("preset, cfg", [("sd1", SD14_TEXT), ("sd2", SD2_TEXT)])
def test_real_geometry_keys(preset: str, cfg: dict) -> None:
    """Our presets have exactly transformers' parameter names and shapes (models built on meta)."""
    assert CLIPTextConfig.from_transformers(cfg) == CLIP_PRESETS[preset]
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
        ours = CLIPTextModel(CLIP_PRESETS[preset])
    ref_shapes = {
        (k if k.startswith("text_model.") else "text_model." + k): tuple(v.shape) for k, v in ref.state_dict().items()
    }
    ref_shapes.pop("text_model.embeddings.position_ids", None)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == {"sd1": 123_060_480, "sd2": 340_387_840}[preset]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers({**SD14_TEXT, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=100, intermediate_size=10, num_layers=1, num_heads=3)
    with pytest.raises(ValueError, match="input_ids"):
        CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2))(
            torch.zeros(1, 78, dtype=torch.long)
        )
