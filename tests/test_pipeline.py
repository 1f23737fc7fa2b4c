"""speedsd.Pipeline against diffusers' StableDiffusion(Img2Img)Pipeline on the same tiny random model.

fp32 on CPU; the same folder is loaded by both; same latents / generator, prompt, negative prompt,
steps and guidance. Latents after the last step and decoded images must agree to RTOL (relative L2).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict

import numpy as np
import pytest
import torch

import speedsd
from checkpoints import make_diffusers_folder
from interp_bounds import needs_interpreter
from speedsd import ops
from speedsd.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")

RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}
PROMPT = "a red fox in the snow"
NEG = "blurry, low quality"
SIZE = 32  # pixels per side (the tiny VAE downsamples 2x: 16x16 latents)

_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True, "solver_type": "midpoint"}
# our scheduler name -> (diffusers class, extra kwargs) of the scheduler it reproduces
DIFFUSERS_SCHEDULERS = {
    "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, _DPM),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**_DPM, "use_karras_sigmas": True}),
}
DETERMINISTIC = ["pndm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"]


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def diffusers_scheduler(ours: Pipeline, name: str):
    """The diffusers scheduler with exactly our scheduler config (keys diffusers' class accepts)."""
    cls, extra = DIFFUSERS_SCHEDULERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    cfg = {k: v for k, v in asdict(ours.components.scheduler_config).items() if k in accepted}
    if name != "dpmpp_2m_karras" and "use_karras_sigmas" in cfg:
        cfg["use_karras_sigmas"] = False
    return cls(**{**cfg, **extra})


class Pair:
    """One tiny model loaded by both: diffusers (text2img + img2img) and speedsd."""

    def __init__(self, folder, dtype: torch.dtype = torch.float32) -> None:
        self.folder, self.dtype, self.rtol = folder, dtype, RTOL[dtype]
        kw = dict(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
        self.ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, **kw)
        self.ref.set_progress_bar_config(disable=True)
        self.ours = speedsd.load(str(folder), device="cpu", dtype=dtype)
        self.latent_shape = (1, 4, SIZE // self.ours.vae_scale, SIZE // self.ours.vae_scale)

    def img2img_ref(self):
        p = diffusers.StableDiffusionImg2ImgPipeline(**self.ref.components)
        p.set_progress_bar_config(disable=True)
        return p

    def latents(self, n: int = 1, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n,) + self.latent_shape[1:], generator=g).to(self.dtype)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("sd1"), kind="sd1")


@pytest.fixture(scope="module")
def sd1(sd1_folder) -> Pair:
    return Pair(sd1_folder)


@pytest.fixture(scope="module")
def sd1_f64(sd1_folder) -> Pair:
    return Pair(sd1_folder, torch.float64)


@pytest.fixture(scope="module")
def sd2_f64(tmp_path_factory) -> Pair:
    return Pair(make_diffusers_folder(tmp_path_factory.mktemp("sd2"), kind="sd2"), torch.float64)


def _compare(pair: Pair, scheduler: str, steps: int = 4, guidance: float = 7.5, **kw) -> None:
    """Latents after the last step (grabbed by the step callbacks) and decoded images, ours vs diffusers."""
    pair.ref.scheduler = diffusers_scheduler(pair.ours, scheduler)
    prompt = kw.pop("prompt", PROMPT)
    n = kw.pop("num_images", 1)
    count = n * (len(prompt) if isinstance(prompt, list) else 1)
    lat = pair.latents(count)
    neg = [NEG] * len(prompt) if isinstance(prompt, list) else NEG  # diffusers wants the same type
    common = dict(negative_prompt=neg, guidance_scale=guidance, height=SIZE, width=SIZE)
    last: dict[str, torch.Tensor] = {}

    def grab_ref(pipe, i, t, kwargs):
        last["ref"] = kwargs["latents"].clone()
        return kwargs

    ref_img = pair.ref(
        prompt,
        num_inference_steps=steps,
        latents=lat.clone(),
        num_images_per_prompt=n,
        output_type="np",
        callback_on_step_end=grab_ref,
        **common,
    ).images  # [N, H, W, 3] in [0, 1]
    ours_img = pair.ours(
        prompt,
        steps=steps,
        latents=lat,
        num_images=n,
        scheduler=scheduler,
        output="tensor",
        callback=lambda i, num, t, x: last.__setitem__("ours", x.clone()),
        **common,
    )
    assert last["ours"].shape == last["ref"].shape
    err = rel(last["ours"], last["ref"])
    assert err <= pair.rtol, f"latents differ: {err:.2e}"
    assert rel(last["ours"], lat) > 0.05  # the sampler moved them
    ours_img = ours_img.permute(0, 2, 3, 1).numpy()  # [N, 3, H, W] -> [N, H, W, 3]
    assert ours_img.shape == ref_img.shape == (count, SIZE, SIZE, 3)
    assert ref_img.std() > 0.01  # not a flat (fully clipped) picture
    err = rel(ours_img, ref_img)
    assert err <= pair.rtol, f"images differ: {err:.2e}"


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_matches_diffusers(sd1: Pair, scheduler: str) -> None:
    _compare(sd1, scheduler)


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp_2m_karras"])
def test_matches_diffusers_fp64(sd1_f64: Pair, scheduler: str) -> None:
    _compare(sd1_f64, scheduler)


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_matches_diffusers_v_prediction_sd2(sd2_f64: Pair, scheduler: str) -> None:
    """fp64: in fp32 the SD2 UNet's linear-projection blocks hand channels_last-strided tensors to
    F.group_norm, whose CPU kernel then loses ~1e-2 on this random model's ill-conditioned groups."""
    assert sd2_f64.ours.components.scheduler_config.prediction_type == "v_prediction"
    _compare(sd2_f64, scheduler)


def test_matches_diffusers_batch_and_num_images(sd1: Pair) -> None:
    _compare(sd1, "ddim", steps=3, prompt=["a red fox", "a green owl on a branch"], num_images=2)


def test_no_guidance_skips_the_uncond_half(sd1: Pair, monkeypatch) -> None:
    batches = []
    orig = sd1.ours.unet_step
    monkeypatch.setattr(sd1.ours, "unet_step", lambda x, t, e: batches.append(x.shape[0]) or orig(x, t, e))
    _compare(sd1, "euler", steps=3, guidance=1.0)
    assert batches and set(batches) == {1}
    batches.clear()
    sd1.ours(PROMPT, steps=2, scheduler="euler", height=SIZE, width=SIZE, output="latent")
    assert batches == [2, 2]  # CFG: uncond + cond in one batch


def test_euler_ancestral_seeded_matches_diffusers(sd1: Pair) -> None:
    """Same seed, same draws: initial noise, then one draw per step, all from one CPU generator."""
    sd1.ref.scheduler = diffusers_scheduler(sd1.ours, "euler_a")
    common = dict(negative_prompt=NEG, guidance_scale=7.5, height=SIZE, width=SIZE)
    g = torch.Generator("cpu").manual_seed(1234)
    ref = sd1.ref(PROMPT, num_inference_steps=5, generator=g, output_type="latent", **common).images
    ours = sd1.ours(PROMPT, steps=5, seed=1234, scheduler="euler_a", output="latent", **common)
    assert rel(ours, ref) <= sd1.rtol
    other = sd1.ours(PROMPT, steps=5, seed=1235, scheduler="euler_a", output="latent", **common)
    assert rel(other, ref) > 0.1


def _randn_fp32_then_cast(shape, generator=None, device=None, dtype=None, layout=None):
    """diffusers' randn_tensor with speedsd's documented draw: fp32 on the CPU, then cast and moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def test_img2img_matches_diffusers(sd1_f64: Pair, monkeypatch) -> None:
    """fp64 (the tiny random VAE makes huge latents, where fp32 rounding alone reaches ~1e-4), with
    diffusers' posterior sample and forward noise drawn as speedsd draws them (fp32, then cast)."""
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as diffusers_i2i
    from PIL import Image

    monkeypatch.setattr(diffusers_vae, "randn_tensor", _randn_fp32_then_cast)
    monkeypatch.setattr(diffusers_i2i, "randn_tensor", _randn_fp32_then_cast)
    pair = sd1_f64
    ref_pipe = pair.img2img_ref()
    ref_pipe.scheduler = diffusers_scheduler(pair.ours, "ddim")
    rng = np.random.default_rng(0)
    init = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 200 + 30).astype(np.uint8))
    common = dict(negative_prompt=NEG, guidance_scale=7.5)
    g = torch.Generator("cpu").manual_seed(77)
    ref = ref_pipe(PROMPT, image=init, strength=0.6, num_inference_steps=5, generator=g, output_type="np", **common)
    ref = ref.images
    calls = []
    ours = pair.ours.img2img(
        PROMPT,
        init,
        strength=0.6,
        steps=5,
        seed=77,
        scheduler="ddim",
        output="tensor",
        callback=lambda i, n, t, x: calls.append((i, n, int(t))),
        **common,
    )
    ours = ours.permute(0, 2, 3, 1).numpy()
    assert ref.std() > 0.01
    assert rel(ours, ref) <= pair.rtol, f"{rel(ours, ref):.2e}"
    assert calls == [(0, 3, 401), (1, 3, 201), (2, 3, 1)]  # the last int(5 * 0.6) of 801, 601, ... 1
    other = pair.ours.img2img(PROMPT, init, strength=0.6, steps=5, seed=78, scheduler="ddim", output="tensor", **common)
    assert rel(other.permute(0, 2, 3, 1).numpy(), ref) > 1e-3  # the seed matters


def test_long_prompt_blocks_match_diffusers_given_their_embeddings(sd1_folder) -> None:
    """A prompt past 75 tokens: speedsd reads it in 75-token blocks (the negative padded with empty blocks),
    the oracle is diffusers fed those blocks' text-encoder outputs side by side (prompt_embeds);
    truncate_prompt=True is diffusers' own reading of the prompt string (the first 75 tokens). fp64; the
    cross-attention's to_out is scaled up in both models so the text moves the latents well past rtol."""
    pair = Pair(sd1_folder, torch.float64)  # its own models: the weights are changed below
    for model in (pair.ref.unet, pair.ours.unet):
        for name, w in model.named_parameters():
            if name.endswith("attn2.to_out.0.weight"):
                w.data.mul_(300.0)
    pair.ref.scheduler = diffusers_scheduler(pair.ours, "ddim")
    prompt = "a red fox in the snow under a green tree " * 12
    tok = pair.ours.tokenizer
    k = tok.chunks(prompt)
    assert k >= 2 and tok.chunks(NEG) == 1
    ids = tok([NEG, prompt], chunks=k)  # [2, k·77]
    with torch.no_grad():
        emb = pair.ref.text_encoder(ids.view(-1, 77))[0].view(2, k * 77, -1)  # each block on its own
    lat = pair.latents()
    common = dict(guidance_scale=7.5, height=SIZE, width=SIZE)
    ref = pair.ref(prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], num_inference_steps=3,
                   latents=lat.clone(), output_type="latent", **common).images  # fmt: skip
    ref_cut = pair.ref(prompt, negative_prompt=NEG, num_inference_steps=3, latents=lat.clone(),
                       output_type="latent", **common).images  # fmt: skip
    run = dict(negative_prompt=NEG, steps=3, latents=lat, scheduler="ddim", output="latent", **common)
    ours = pair.ours(prompt, **run)
    ours_cut = pair.ours(prompt, truncate_prompt=True, **run)
    assert rel(ref, ref_cut) > 30 * pair.rtol, f"{rel(ref, ref_cut):.2e}"  # the blocks past the first matter
    assert rel(ours, ref) <= pair.rtol, f"{rel(ours, ref):.2e}"
    assert rel(ours_cut, ref_cut) <= pair.rtol, f"{rel(ours_cut, ref_cut):.2e}"
    with pytest.raises(ValueError, match="truncate_prompt must be true or false"):
        pair.ours(prompt, truncate_prompt="yes", **run)


def test_seed_determinism_and_documented_noise(sd1: Pair) -> None:
    kw = dict(steps=3, scheduler="euler", height=SIZE, width=SIZE, output="tensor")
    a = sd1.ours(PROMPT, seed=42, **kw)
    b = sd1.ours(PROMPT, seed=42, **kw)
    c = sd1.ours(PROMPT, seed=43, **kw)
    assert torch.equal(a, b)
    assert rel(c, a) > 0.01
    assert sd1.ours.last_seed == 43
    # seed == torch.Generator("cpu").manual_seed(seed) drawing fp32 standard normal latents
    noise = torch.randn(sd1.latent_shape, generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(sd1.ours(PROMPT, latents=noise, **kw), a)


def test_no_seed_draws_one_from_torch_rng(sd1: Pair) -> None:
    kw = dict(steps=2, scheduler="ddim", height=SIZE, width=SIZE, output="latent")
    torch.manual_seed(5)
    a = sd1.ours(PROMPT, **kw)
    seed = sd1.ours.last_seed
    assert isinstance(seed, int)
    assert torch.equal(sd1.ours(PROMPT, seed=seed, **kw), a)
    torch.manual_seed(5)
    assert torch.equal(sd1.ours(PROMPT, **kw), a)


@pytest.mark.parametrize("scheduler,calls", [("ddim", 4), ("euler", 4), ("dpmpp_2m", 4)])
def test_callback_once_per_step(sd1: Pair, scheduler: str, calls: int) -> None:
    seen = []
    sd1.ours(
        PROMPT,
        steps=4,
        scheduler=scheduler,
        height=SIZE,
        width=SIZE,
        seed=0,
        output="latent",
        callback=lambda i, n, t, x: seen.append((i, n, float(t), tuple(x.shape))),
    )
    assert [s[:2] for s in seen] == [(i, calls) for i in range(calls)]
    assert all(s[3] == sd1.latent_shape for s in seen)
    assert [s[2] for s in seen] == sorted((s[2] for s in seen), reverse=True)  # descending timesteps


def test_pil_output(sd1: Pair) -> None:
    images = sd1.ours(PROMPT, steps=2, scheduler="ddim", height=SIZE, width=SIZE + 16, seed=1, num_images=2)
    assert len(images) == 2 and all(im.size == (SIZE + 16, SIZE) and im.mode == "RGB" for im in images)
    t = sd1.ours(PROMPT, steps=2, scheduler="ddim", height=SIZE, width=SIZE + 16, seed=1, num_images=2, output="tensor")
    expect = (t.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), expect)


def test_model_calls_run_under_the_pipeline_flags(sd1_f64: Pair, monkeypatch) -> None:
    flags = ops.Flags(attention="math", channels_last=True)
    pipe = sd1_f64.ours.with_flags(flags)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    for m in pipe.models():
        orig = m.forward
        monkeypatch.setattr(m, "forward", lambda *a, _o=orig, **k: seen.append(ops.current()) or _o(*a, **k))
    for name in ("encode", "decode"):
        orig = getattr(pipe.vae, name)
        monkeypatch.setattr(pipe.vae, name, lambda *a, _o=orig, **k: seen.append(ops.current()) or _o(*a, **k))
    kw = dict(steps=2, scheduler="ddim", height=SIZE, width=SIZE, seed=3, output="tensor")
    out = pipe(PROMPT, **kw)
    assert len(seen) == 1 + 2 + 1 and all(f == flags for f in seen)  # text encoder, 2 UNet steps, decode
    assert ops.current() != flags  # restored
    monkeypatch.undo()
    ref = sd1_f64.ours.with_flags(ops.PRESETS["reference"])  # contiguous weights again
    assert ref.unet.conv_in.weight.is_contiguous()
    assert rel(out, ref(PROMPT, **kw)) < 1e-8  # fp64: layout and attention path change only rounding


def test_shared_weights_follow_each_pipelines_layout(sd1_f64: Pair, monkeypatch) -> None:
    """with_flags copies share weights; each call puts them in its own layout and drops stale graphs."""
    a = sd1_f64.ours.with_flags(ops.Flags(attention="sdpa", channels_last=True))
    b = sd1_f64.ours.with_flags(ops.PRESETS["reference"])
    w = lambda: b.unet.conv_in.weight  # noqa: E731
    assert w().is_contiguous()
    resets = []
    monkeypatch.setattr(a, "reset_graphs", lambda: resets.append("a"))
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    emb = a.encode_text(["x", "y"])
    out_a = a.unet_step(x, torch.tensor(500), emb)
    assert w().is_contiguous(memory_format=torch.channels_last) and not w().is_contiguous()
    assert not w().is_inference()  # converted inside inference_mode, still ordinary tensors
    assert resets == ["a"]
    out_b = b.unet_step(x, torch.tensor(500), emb)
    assert w().is_contiguous()
    a.unet_step(x, torch.tensor(500), emb)
    assert resets == ["a", "a"]  # b's conversion invalidated a's graphs
    a.unet_step(x, torch.tensor(500), emb)
    assert resets == ["a", "a"]  # no conversion, no reset
    assert rel(out_a, out_b) < 1e-10


def test_half_precision_plumbing(sd1: Pair, monkeypatch) -> None:
    """fp16: the models get fp16 inputs; latents stay fp32. (This random model overflows fp16
    activations, so fp16 numbers are checked on real weights by the GPU bench, not here.)"""
    half = speedsd.load(str(sd1.folder), device="cpu", dtype=torch.float16)
    seen = []
    orig = half.unet.forward
    monkeypatch.setattr(half.unet, "forward", lambda x, t, e: seen.append((x.dtype, e.dtype)) or orig(x, t, e))
    lat = half(PROMPT, steps=2, scheduler="euler", height=SIZE, width=SIZE, seed=9, output="latent")
    assert lat.dtype == torch.float32 and half.dtype == torch.float16
    assert seen == [(torch.float16, torch.float16)] * 2


def test_bf16_close_to_fp32(sd1: Pair) -> None:
    bf16 = speedsd.load(str(sd1.folder), device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    kw = dict(steps=3, scheduler="euler", height=SIZE, width=SIZE, seed=9, output="tensor")
    out = bf16(PROMPT, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel(out, sd1.ours(PROMPT, **kw)) < 5e-2


def test_tiled_decode_real(sd1: Pair) -> None:
    kw = dict(steps=2, scheduler="ddim", height=SIZE, width=SIZE, seed=2, output="tensor")
    a = sd1.ours(PROMPT, tiled_decode=False, **kw)
    b = sd1.ours(PROMPT, tiled_decode=True, **kw)
    assert rel(b, a) < 1e-6  # one tile: exactly decode


BAD = [
    (dict(height=63), "height must be a positive multiple of 8"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(width=64.0), "width must be"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2.5), "steps must be"),
    (dict(guidance_scale=-1.0), "guidance_scale must be"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be"),
    (dict(num_images=0), "num_images must be"),
    (dict(scheduler="euler_b"), "unknown scheduler 'euler_b'"),
    (dict(output="jpg"), "output must be one of"),
    (dict(seed=-1), "seed must be"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents must be a tensor of shape"),
    (dict(prompt=5), "prompt must be a string"),
    (dict(prompt=[]), "prompt must be a string"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_inputs(sd1: Pair, kw: dict, msg: str) -> None:
    kw = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "steps": 2, **kw}
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("*", r"\*")):
        sd1.ours(kw.pop("prompt"), **kw)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(strength=0.0), "strength must be in"),
        (dict(strength=1.5), "strength must be in"),
        (dict(strength=0.1, steps=5), "at least one step"),
        (dict(image="cat.png"), "image must be a PIL image or a tensor"),
        (dict(image=torch.rand(3, 60, 64)), "height must be a positive multiple"),
        (dict(image=torch.rand(1, 4, 64, 64)), r"image tensor must be \[3, H, W\]"),
    ],
)
def test_img2img_bad_inputs(sd1: Pair, kw: dict, msg: str) -> None:
    kw = {"image": torch.rand(3, SIZE, SIZE), "steps": 4, **kw}
    with pytest.raises(ValueError, match=msg):
        sd1.ours.img2img(PROMPT, kw.pop("image"), **kw)


def test_img2img_tensor_equals_pil(sd1: Pair) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    arr = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255  # [H, W, 3] -> [3, H, W]
    kw = dict(strength=0.5, steps=4, scheduler="ddim", seed=3, output="latent")
    a = sd1.ours.img2img(PROMPT, Image.fromarray(arr), **kw)
    b = sd1.ours.img2img(PROMPT, t, **kw)
    assert torch.equal(a, b)


def _stand_in_unet(x: torch.Tensor, ts: torch.Tensor, emb: torch.Tensor, *adds: torch.Tensor) -> torch.Tensor:
    v = emb.float().mean((1, 2)).view(-1, 1, 1, 1) + ts.float().view(-1, 1, 1, 1) * 1e-3  # [B, 1, 1, 1]
    return (x.float() * 0.9 + v).to(x.dtype)


@needs_interpreter  # CPU tensors through the kernels
def test_replaced_unet_step_bypasses_the_plumbing_kernels(monkeypatch) -> None:
    """With fused_epilogues the loop makes the UNet input and combines its output with its own kernels
    (speedsd.denoise), but a unet_step replaced on the instance (a wrapper) or overridden in a subclass
    is still called as before: with the [2N] fp32 latents, and the same result."""
    from speedsd import denoise

    flags = ops.PRESETS["reference"].replace(fused_epilogues=True, channels_last=True)
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float16, flags=flags)
    monkeypatch.setattr(pipe, "_unet_forward", _stand_in_unet)
    kw = dict(steps=2, height=32, width=32, seed=4, output="latent", scheduler="euler", guidance_scale=6.0)
    direct = pipe("a cat", **kw)
    seen = []
    orig = pipe.unet_step
    monkeypatch.setattr(pipe, "unet_step", lambda x, t, e, **k: seen.append((x.shape, x.dtype)) or orig(x, t, e, **k))
    wrapped = pipe("a cat", **kw)
    side = 32 // pipe.vae_scale
    assert seen == [((2, 4, side, side), torch.float32)] * 2  # uncond + cond, fp32 as the loop holds them
    torch.testing.assert_close(wrapped, direct, atol=0, rtol=0)

    class Sub(Pipeline):
        def unet_step(self, *a, **k):
            return super().unet_step(*a, **k)

    sched, x = pipe.make_scheduler("ddim"), torch.randn(1, 4, 16, 16)
    assert denoise.fused_plumbing(Pipeline(pipe.components, flags=flags), sched, x)
    assert not denoise.fused_plumbing(Sub(pipe.components, flags=flags), sched, x)
    assert not denoise.fused_plumbing(pipe, sched, x)  # the instance's replaced unet_step


@pytest.mark.parametrize("pair, tol", [("sd1_f64", 1e-10), ("sd1", 1e-5)])
def test_a_standalone_unet_step_is_a_loop_scope_of_its_own(pair: str, tol: float, request, monkeypatch) -> None:
    """Outside a denoising loop, unet_step folds the small upsamplers' weights itself, once a call, and runs
    them as sub-pixel convs (as a loop does); inside an enclosing scope (the loop's) that scope's folds serve
    every step. The same numbers as nearest + conv (fp64: torch's interleave; fp32: the Triton one)."""
    both = request.getfixturevalue(pair)
    monkeypatch.setattr(ops, "SUBPIXEL_LOOP_MIN_PIXELS", 1)  # the tiny model's upsamplers are below 16x16
    folds = []
    for name in ("subpixel_weight", "subpixel_weight_ref"):  # the kernel where Triton runs, else torch
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda w, _r=real: folds.append(1) or _r(w))
    pipe = both.ours.with_flags(ops.Flags(subpixel_upsample=True))
    ups = sum(len(u.upsamplers) for u in pipe.unet.up_blocks)
    assert ups >= 1
    x = both.latents(2, seed=5)
    emb = pipe.encode_text(["", PROMPT])
    a = pipe.unet_step(x, 400, emb)
    pipe.unet_step(x, 300, emb)
    assert len(folds) == 2 * ups  # one fold a standalone call
    with pipe.unet.context_scope():
        pipe.unet_step(x, 400, emb)
        pipe.unet_step(x, 300, emb)
    assert len(folds) == 3 * ups  # the enclosing scope folded once for both steps
    plain = both.ours.with_flags(ops.Flags(subpixel_upsample=False)).unet_step(x, 400, emb)
    assert rel(a, plain) < tol
