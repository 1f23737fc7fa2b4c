"""load_components on every kind of model source, strictness, safety and the real SD-1.4 geometry."""

import json
import pickle
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import (
    SD14_CONFIGS,
    diffusers_modules,
    make_diffusers_folder,
    make_single_file,
    make_tokenizer_files,
    model_index,
    reference_state_dicts,
    tiny_configs,
    to_original,
)
from speedsd.loading import CheckpointError, Components, load_components

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def _empty_offline_hub_cache(tmp_path, monkeypatch):
    """No test may download, nor find tokenizers in a real cache: an empty private cache, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _assert_loaded(c: Components, refs: dict, dtype=torch.float32) -> None:
    for comp in COMPONENTS:
        module = getattr(c, comp)
        sd = module.state_dict()
        assert set(sd) == set(refs[comp]), sorted(set(sd) ^ set(refs[comp]))[:10]
        bad = [k for k, v in refs[comp].items() if sd[k].dtype != dtype or not torch.equal(sd[k], v.to(dtype))]
        assert not bad, f"{comp}: {bad[:5]}"
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


# ---- diffusers folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, fmt, variant, dtype",
    [
        ("sd1", "safetensors", None, torch.float32),
        ("sd2", "safetensors", None, torch.float32),
        ("sd1", "bin", None, torch.float32),
        ("sd2", "bin", "fp16", torch.float16),
        ("sd1", "safetensors", "fp16", torch.float16),
    ],
)
def test_diffusers_folder(tmp_path, kind, fmt, variant, dtype):
    folder = make_diffusers_folder(tmp_path, kind, fmt=fmt, variant=variant, dtype=dtype)
    c = load_components(folder, dtype=dtype)
    refs = reference_state_dicts(kind)
    if dtype == torch.float16:
        refs = {comp: {k: v.half() for k, v in sd.items()} for comp, sd in refs.items()}
    _assert_loaded(c, refs, dtype)
    assert c.name == folder.name and c.family == kind
    assert c.default_size == 8 * 2  # unet sample_size 8 x VAE downscale 2 (two VAE levels)
    pred = "v_prediction" if kind == "sd2" else "epsilon"
    assert c.scheduler_config.prediction_type == pred
    assert c.default_scheduler == ("ddim" if kind == "sd2" else "pndm")
    assert c.tokenizer.pad_token_id == (0 if kind == "sd2" else c.tokenizer.eos_token_id)
    assert c.unet.config.upcast_attention == (kind == "sd2")


def test_folder_prefers_the_variant_matching_dtype(tmp_path):
    make_diffusers_folder(tmp_path, "sd1", name="both", seed=0)
    make_diffusers_folder(tmp_path, "sd1", name="both", seed=1, variant="fp16", dtype=torch.float16)
    half = load_components(tmp_path / "both", dtype=torch.float16)
    full = load_components(tmp_path / "both", dtype=torch.float32)
    ref1 = {comp: {k: v.half() for k, v in sd.items()} for comp, sd in reference_state_dicts("sd1", 1).items()}
    _assert_loaded(half, ref1, torch.float16)
    _assert_loaded(full, reference_state_dicts("sd1", 0))


def test_folder_text_encoder_without_text_model_prefix(tmp_path):
    """transformers 5's save_pretrained drops the ``text_model.`` level; both spellings load."""
    folder = make_diffusers_folder(tmp_path, "sd1", text_model_prefix=False)
    _assert_loaded(load_components(folder), reference_state_dicts("sd1"))


def test_folder_prediction_type_override_and_missing_tokenizer(tmp_path):
    folder = make_diffusers_folder(tmp_path, "sd1")
    assert load_components(folder, prediction_type="v_prediction").scheduler_config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        load_components(folder, prediction_type="sample")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="no CLIP tokenizer found for tiny-sd1-safetensors"):
        load_components(folder)
    other = make_tokenizer_files(tmp_path / "tok")
    assert load_components(folder, tokenizer=other).tokenizer.vocab_size == 521


def test_folder_strict_errors(tmp_path):
    folder = make_diffusers_folder(tmp_path, "sd1")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd.pop("conv_out.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_components(folder)
    msg = str(e.value)
    assert "\n" not in msg and "unet/diffusion_pytorch_model.safetensors" in msg
    assert "1 missing (conv_out.bias)" in msg and "1 unexpected (extra.weight)" in msg
    assert "1 wrong shape (conv_in.weight [32, 4, 1, 1] (model [32, 4, 3, 3]))" in msg


def test_folder_unsupported_and_broken(tmp_path):
    folder = make_diffusers_folder(tmp_path, "sd1")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(CheckpointError, match="unsupported unet config: .*addition_embed_type"):
        load_components(folder)
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    with pytest.raises(CheckpointError, match="9 input channels"):
        load_components(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(CheckpointError, match="unsupported architecture: StableDiffusionXLPipeline"):
        load_components(folder)
    (folder / "model_index.json").write_text(json.dumps(model_index(tiny_configs("sd1"))))
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*vae"):
        load_components(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_components(folder)


# ---- original single files --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file(tmp_path, kind, fmt):
    path = make_single_file(tmp_path, kind, fmt=fmt)
    c = load_components(path)
    _assert_loaded(c, reference_state_dicts(kind))
    assert c.family == kind and c.name == path.name
    if kind == "sd1":
        assert (c.scheduler_config.prediction_type, c.default_size, c.default_scheduler) == ("epsilon", 512, "pndm")
        assert c.tokenizer.pad_token_id == c.tokenizer.eos_token_id
    else:  # SD 2.x default: v-prediction, 768, fp32 attention scores; pads with "!" (id 0)
        assert (c.scheduler_config.prediction_type, c.default_size, c.default_scheduler) == (
            "v_prediction",
            768,
            "ddim",
        )
        assert c.unet.config.upcast_attention
        assert c.tokenizer.pad_token_id == 0
    assert c.text_encoder.config.num_layers == 2  # SD 2.x: the file's third (last) resblock dropped


def test_sd2_prediction_type_rules(tmp_path):
    base = make_single_file(tmp_path, "sd2", name="v2-1_512-ema-pruned.safetensors")
    c = load_components(base)
    assert (c.scheduler_config.prediction_type, c.default_size, c.unet.config.upcast_attention) == (
        "epsilon",
        512,
        False,
    )
    assert c.default_scheduler == "pndm"
    v = make_single_file(tmp_path, "sd2", name="model.safetensors")
    assert load_components(v).scheduler_config.prediction_type == "v_prediction"
    c = load_components(v, prediction_type="epsilon")
    assert (c.scheduler_config.prediction_type, c.default_size) == ("epsilon", 512)
    # a .ckpt at global step 875000 is SD 2.0-base (epsilon), as diffusers also decides
    sd = torch.load(make_single_file(tmp_path, "sd2", fmt="ckpt"), weights_only=True)
    sd["global_step"] = 875000
    torch.save(sd, tmp_path / "tiny-sd2" / "step.ckpt")
    assert load_components(tmp_path / "tiny-sd2" / "step.ckpt").scheduler_config.prediction_type == "epsilon"


def test_single_file_fp16_unwrapped_ckpt_and_old_clip_keys(tmp_path):
    half = make_single_file(tmp_path, "sd1", dtype=torch.float16, name="half.safetensors")
    refs16 = {comp: {k: v.half() for k, v in sd.items()} for comp, sd in reference_state_dicts("sd1").items()}
    _assert_loaded(load_components(half, dtype=torch.float16), refs16, torch.float16)
    bare = make_single_file(tmp_path, "sd1", fmt="ckpt", wrap=False, name="bare.ckpt")
    _assert_loaded(load_components(bare), reference_state_dicts("sd1"))
    # early SD 1.x files: CLIP keys without transformers' "text_model." level
    sd = load_file(make_single_file(tmp_path, "sd1", name="old.safetensors"))
    p = "cond_stage_model.transformer."
    sd = {p + k[len(p + "text_model.") :] if k.startswith(p + "text_model.") else k: v for k, v in sd.items()}
    save_file(sd, tmp_path / "old" / "old.safetensors")
    _assert_loaded(load_components(tmp_path / "old" / "old.safetensors"), reference_state_dicts("sd1"))


def test_single_file_strict_errors(tmp_path):
    path = make_single_file(tmp_path, "sd1")
    sd = load_file(path)
    sd.pop("model.diffusion_model.out.2.bias")
    sd.pop("first_stage_model.decoder.mid.attn_1.q.weight")
    sd["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = torch.zeros(16)
    sd["model.diffusion_model.surprise.weight"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_components(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tiny-sd1.safetensors: ")
    assert "2 missing (model.diffusion_model.out.2.bias, first_stage_model.decoder.mid.attn_1.q.weight)" in msg
    assert "1 unexpected (model.diffusion_model.surprise.weight)" in msg
    assert "1 wrong shape (model.diffusion_model.input_blocks.1.0.in_layers.0.weight [16]" in msg


def test_single_file_unsupported(tmp_path):
    sd = load_file(make_single_file(tmp_path, "sd1"))
    sd["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 8)
    save_file(sd, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="xl.safetensors: .*SDXL"):
        load_components(tmp_path / "xl.safetensors")
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "llm.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        load_components(tmp_path / "llm.safetensors")


def test_single_file_tokenizer_lookup(tmp_path, monkeypatch):
    path = make_single_file(tmp_path, "sd1", tokenizer=False)
    with pytest.raises(CheckpointError) as e:
        load_components(path)
    assert str(e.value) == (
        "no CLIP tokenizer found for tiny-sd1.safetensors: put vocab.json and merges.txt (from "
        "openai/clip-vit-large-patch14) in a tokenizer/ folder beside it, or pass --tokenizer DIR"
    )
    with pytest.raises(CheckpointError, match="stabilityai/stable-diffusion-2-1 \\(the tokenizer/ folder\\)"):
        load_components(make_single_file(tmp_path, "sd2", tokenizer=False))
    with pytest.raises(CheckpointError, match="tokenizer .*nowhere: no vocab.json"):
        load_components(path, tokenizer=tmp_path / "nowhere")
    assert load_components(path, tokenizer=make_tokenizer_files(tmp_path / "t")).tokenizer.vocab_size == 521
    make_tokenizer_files(path.parent)  # vocab.json + merges.txt right beside the file
    assert load_components(path).tokenizer.vocab_size == 521
    for f in ("vocab.json", "merges.txt"):
        (path.parent / f).unlink()
    # the local hub cache (no network): openai/clip-vit-large-patch14
    snap = tmp_path / "hf-cache" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    make_tokenizer_files(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    assert load_components(path).tokenizer.vocab_size == 521


# ---- .ckpt safety, corrupt and missing files -------------------------------------------------


class _Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1), "evil": _Hostile(marker)}}
    path = tmp_path / "hostile.ckpt"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="hostile.ckpt: refused: .*weights_only") as e:
        load_components(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    good = make_single_file(tmp_path, "sd1")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "noise.ckpt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "empty.ckpt").write_bytes(b"")
    ckpt = make_single_file(tmp_path, "sd1", fmt="ckpt")
    (tmp_path / "trunc.ckpt").write_bytes(ckpt.read_bytes()[:5000])
    torch.save({"state_dict": {}}, tmp_path / "nothing.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    cases = {
        "trunc.safetensors": "not a valid safetensors file",
        "noise.safetensors": "not a valid safetensors file",
        "noise.ckpt": "trunc|refused|not a readable checkpoint",
        "empty.ckpt": "not a readable checkpoint",
        "trunc.ckpt": "not a readable checkpoint",
        "nothing.ckpt": "not a checkpoint",
        "list.ckpt": "not a checkpoint",
    }
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_components(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value), name
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file or directory"):
        load_components(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_components(tmp_path)


# ---- hub ids and random weights ----------------------------------------------------------------


def test_hub_id_offline(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_components("CompVis/stable-diffusion-v1-4")
    msg = str(e.value)
    assert msg.startswith("CompVis/stable-diffusion-v1-4: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in msg and "model_index.json, unet/" in msg and "\n" not in msg
    # a cached snapshot is found without any network
    folder = make_diffusers_folder(tmp_path, "sd1")
    repo = tmp_path / "hf-cache" / "models--someone--tiny-sd"
    shutil.copytree(folder, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc\n")
    c = load_components("someone/tiny-sd")
    assert c.name == "someone/tiny-sd"
    _assert_loaded(c, reference_state_dicts("sd1"))


def test_random_preset_geometry_on_meta():
    mods = diffusers_modules(SD14_CONFIGS, device="meta")
    c = load_components("random:sd1.4", device="meta", dtype=torch.float16)
    for comp in COMPONENTS:
        want = {k: tuple(v.shape) for k, v in mods[comp].state_dict().items() if not k.endswith("position_ids")}
        if comp == "text_encoder":
            want = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in want.items()}
        got = {k: tuple(v.shape) for k, v in getattr(c, comp).state_dict().items()}
        assert got == want, comp
        assert {v.dtype for v in getattr(c, comp).state_dict().values()} == {torch.float16}
    assert (c.name, c.default_size, c.default_scheduler, c.tokenizer.source) == ("sd1.4", 512, "pndm", "fallback")
    assert load_components("random:sd2.1", device="meta").scheduler_config.prediction_type == "v_prediction"
    with pytest.raises(CheckpointError, match="random:sd9: unknown preset"):
        load_components("random:sd9")


def test_random_weights_are_deterministic_and_sane(tmp_path, monkeypatch):
    from speedsd.models import clip, unet, vae

    cfgs = tiny_configs("sd1")  # keep the fill test small: tiny geometry under the preset's names
    monkeypatch.setitem(unet.UNET_PRESETS, "sd1", unet.UNetConfig.from_diffusers(cfgs["unet"]))
    monkeypatch.setitem(clip.CLIP_PRESETS, "sd1", clip.CLIPTextConfig.from_transformers(cfgs["text_encoder"]))
    monkeypatch.setitem(vae.VAE_PRESETS, "sd", vae.VAEConfig.from_diffusers(cfgs["vae"]))
    a = load_components("random:sd1.5", tokenizer=make_tokenizer_files(tmp_path / "tok"))
    b = load_components("random:sd1.5")
    assert a.tokenizer.source == "files" and b.tokenizer.source == "fallback"
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k]), k
    w = a.unet.conv_in.weight
    assert abs(w.std().item() - (4 * 9) ** -0.5) < 0.02 and torch.isfinite(w).all()
    assert torch.equal(a.unet.conv_norm_out.weight, torch.ones(32))


# ---- the real SD-1.4 geometry on disk ------------------------------------------------------------


@pytest.mark.slow
def test_real_sd14_geometry_both_layouts(tmp_path):
    """~1.07B random parameters in fp16 written as a diffusers folder and as one original file, then
    loaded back with no missing or unused key and every tensor equal."""
    t0 = time.perf_counter()
    src = load_components("random:sd1.4", dtype=torch.float16)
    refs = {comp: getattr(src, comp).state_dict() for comp in COMPONENTS}
    del src
    folder = tmp_path / "sd14"
    for comp, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        (folder / comp).mkdir(parents=True)
        (folder / comp / "config.json").write_text(json.dumps(SD14_CONFIGS[comp]))
        save_file(refs[comp], folder / comp / f"{stem}.fp16.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_CONFIGS["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps(model_index(SD14_CONFIGS)))
    make_tokenizer_files(folder / "tokenizer")
    single = tmp_path / "single" / "sd-v1-4.safetensors"
    single.parent.mkdir()
    save_file({k: v.contiguous() for k, v in to_original(refs, SD14_CONFIGS, "sd1").items()}, single)
    make_tokenizer_files(single.parent / "tokenizer")
    t_write = time.perf_counter()
    for where in (folder, single):
        c = load_components(where, dtype=torch.float16)
        _assert_loaded(c, refs, torch.float16)
        del c
    t_end = time.perf_counter()
    print(f"\nSD-1.4 geometry: random init + write {t_write - t0:.1f}s, 2 loads + compare {t_end - t_write:.1f}s")
