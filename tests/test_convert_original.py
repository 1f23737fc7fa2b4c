"""The original (LDM) <-> diffusers key mapping, checked against diffusers' own converters.

tests/checkpoints.py writes original-layout files with its own renaming (``to_original``); diffusers'
``convert_ldm_*`` functions are the oracle that this renaming is right (they must give back the
diffusers state dict), and speedsd.convert_original must read the same file back into the same
tensors. The real SD-1.4 / SD-2.1 geometries are checked on the meta device (shapes only).
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu

from checkpoints import SD14_CONFIGS, SD21_CONFIGS, diffusers_modules, reference_state_dicts, tiny_configs, to_original
from speedsd import convert_original as co
from speedsd.models.clip import CLIP_PRESETS, CLIPTextConfig
from speedsd.models.unet import UNET_PRESETS, UNetConfig
from speedsd.models.vae import VAE_PRESETS, VAEConfig
from speedsd.presets import MODEL_PRESETS

COMPONENTS = ("unet", "vae", "text_encoder")


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, bad[:10]


def _oracle_text(orig: dict, kind: str, n_layers: int, hidden: int) -> dict:
    if kind == "sd1":
        out = sfu.convert_ldm_clip_checkpoint(orig)
        return {k: v for k, v in out.items() if not k.endswith("position_ids")}
    out = sfu.convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), orig)
    # diffusers drops the last resblock only when it is number 23 (real SD 2.x); here it is n_layers
    extra = [k for k in out if k.startswith(f"text_model.encoder.layers.{n_layers}.")]
    assert len(extra) == 16
    return {k: v for k, v in out.items() if k not in extra and k != "text_projection.weight"}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_test_helper_layout_matches_diffusers_converters(kind):
    cfgs = tiny_configs(kind)
    refs = reference_state_dicts(kind)
    orig = to_original(refs, cfgs, kind)
    _assert_same(sfu.convert_ldm_unet_checkpoint(orig, cfgs["unet"]), refs["unet"])
    _assert_same(sfu.convert_ldm_vae_checkpoint(orig, cfgs["vae"]), refs["vae"])
    text_cfg = cfgs["text_encoder"]
    _assert_same(_oracle_text(orig, kind, text_cfg["num_hidden_layers"], text_cfg["hidden_size"]), refs["text_encoder"])


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_convert_original_reads_back_every_tensor(kind):
    cfgs = tiny_configs(kind)
    refs = reference_state_dicts(kind)
    orig = to_original(refs, cfgs, kind)
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    assert co.detect_family(shapes) == kind
    dicts = co.infer_configs(shapes, kind)
    used = set()
    for comp in COMPONENTS:
        got = {}
        for dkey, ref in refs[comp].items():
            src = co.source_for(comp, dkey, kind, dicts, shapes)
            assert co.shape_matches(src.op, shapes[src.key], tuple(ref.shape)), (dkey, src)
            got[dkey] = co.materialize(src, orig.__getitem__)
            used.add(src.key)
        _assert_same(got, refs[comp])
    n_text = dicts["text_encoder"]["num_hidden_layers"]
    assert n_text == cfgs["text_encoder"]["num_hidden_layers"]
    ignored = sorted(k for k in orig if k not in used)
    assert all(co.is_ignored(k, kind, n_text) for k in ignored), ignored
    extras = {"alphas_cumprod", "betas", "model_ema.decay", "model_ema.num_updates"}
    assert extras <= set(ignored)  # the known extras are skipped on purpose, not used by accident
    # geometry: the tiny configs come back (UNet heads follow the family rule the configs obey)
    assert UNetConfig.from_diffusers(dicts["unet"]).replace(sample_size=8, upcast_attention=kind == "sd2") == (
        UNetConfig.from_diffusers(cfgs["unet"])
    )
    assert dataclasses.replace(VAEConfig.from_diffusers(dicts["vae"]), sample_size=16) == VAEConfig.from_diffusers(
        cfgs["vae"]
    )
    assert CLIPTextConfig.from_transformers(dicts["text_encoder"]) == CLIPTextConfig.from_transformers(
        text_cfg := cfgs["text_encoder"]
    )
    assert text_cfg["hidden_act"] == ("quick_gelu" if kind == "sd1" else "gelu")


@pytest.mark.parametrize("name", ["sd1.4", "sd2.1"])
def test_real_geometry_maps_completely(name):
    """Real SD-1.4 / SD-2.1 shapes (meta tensors): configs inferred = our presets = the hub configs, and
    every diffusers key has a source of the right shape, every file key is used or a known extra."""
    cfgs, kind = (SD14_CONFIGS, "sd1") if name == "sd1.4" else (SD21_CONFIGS, "sd2")
    preset = MODEL_PRESETS[name]
    mods = diffusers_modules(cfgs, device="meta")
    refs = {
        comp: {k: v for k, v in mods[comp].state_dict().items() if not k.endswith("position_ids")}
        for comp in COMPONENTS
    }
    refs["text_encoder"] = {
        k if k.startswith("text_model.") else "text_model." + k: v for k, v in refs["text_encoder"].items()
    }
    orig = to_original(refs, cfgs, kind)
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    assert co.detect_family(shapes) == kind
    dicts = co.infer_configs(shapes, kind)
    unet = UNET_PRESETS[preset.unet]
    assert UNetConfig.from_diffusers(cfgs["unet"]) == unet
    assert UNetConfig.from_diffusers(dicts["unet"]) == unet.replace(sample_size=64, upcast_attention=False)
    assert CLIPTextConfig.from_transformers(cfgs["text_encoder"]) == CLIP_PRESETS[preset.clip]
    assert CLIPTextConfig.from_transformers(dicts["text_encoder"]) == CLIP_PRESETS[preset.clip]
    assert (
        VAEConfig.from_diffusers(dicts["vae"])
        == VAE_PRESETS[preset.vae]
        == VAEConfig.from_diffusers(SD14_CONFIGS["vae"])
    )
    used = set()
    for comp in COMPONENTS:
        for dkey, v in refs[comp].items():
            src = co.source_for(comp, dkey, kind, dicts, shapes)
            assert src.key in shapes and co.shape_matches(src.op, shapes[src.key], tuple(v.shape)), (dkey, src)
            used.add(src.key)
    left = [
        k for k in shapes if k not in used and not co.is_ignored(k, kind, dicts["text_encoder"]["num_hidden_layers"])
    ]
    assert left == []
    if kind == "sd2":  # the 24th OpenCLIP resblock exists in the file and is the one skipped
        assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight" in shapes
        assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight" not in used
        # and diffusers' converter (which hard-codes index 23) agrees on which keys exist
        oracle = _oracle_keys_sd2(orig)
        assert oracle == set(refs["text_encoder"])


def _oracle_keys_sd2(orig: dict) -> set:
    out = sfu.convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=1024)), orig)
    return set(out) - {"text_projection.weight"}


def _shapes(**extra):
    base = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    }
    return {**base, **extra}


@pytest.mark.parametrize(
    "shapes, message",
    [
        (_shapes(**{"conditioner.embedders.0.transformer.text_model.x": (1,)}), "SDXL"),
        (_shapes(**{"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}), "label_emb"),
        ({"down_blocks.0.resnets.0.conv1.weight": (1,)}, "diffusers component"),
        ({"weight": (3,), "bias": (3,)}, "no model.diffusion_model"),
        (_shapes(**{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}), "9 input channels"),
        (_shapes(**{"cond_stage_model.model.token_embedding.weight": (49408, 1024)}), "both"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "no text encoder"),
    ],
)
def test_detect_family_rejects(shapes, message):
    with pytest.raises(co.CheckpointError, match=message):
        co.detect_family(shapes)


def test_shape_matches_ops():
    assert co.shape_matches("squeeze", (512, 512, 1, 1), (512, 512))
    assert co.shape_matches("squeeze", (512, 512), (512, 512))
    assert not co.shape_matches("squeeze", (512, 512, 3, 3), (512, 512))
    assert co.shape_matches("q", (3072, 1024), (1024, 1024))
    assert not co.shape_matches("k", (2048, 1024), (1024, 1024))
    t = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(co.materialize(co.Source("w", "v"), {"w": t}.__getitem__), t[4:])
