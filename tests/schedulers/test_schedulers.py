"""Every sampler against diffusers 0.42.1's scheduler of the same config, step by step.

Both sides run their own denoising loop from the same initial latents with the same fake "UNet"
(0.3 * unet_input + sin(t / 97) * R, a deterministic function of the scaled sample and t), so errors
compound as in a real run. Checked: timesteps (exactly, dtype included), init_noise_sigma, every
scale_model_input and every step output, add_noise and the img2img timestep selection.

Tolerance basis: inputs are fp64, the dtype diffusers keeps end to end (its schedulers only round the
sample to fp32 where they call ``sample.to(float32)``, which we mirror, and use fp32 tables / 0-dim
scalar coefficients, which we mirror too). So any deviation in the math or the tables shows up far
above the fp64 noise floor: we require max |ours - diffusers| <= 1e-6 absolute at every step
(latents are O(1) for VP samplers and up to ~50 for sigma-space Euler at sigma_max ~ 14.6). A second
test repeats the comparison with fp32 inputs (the pipeline's dtype), where op-order rounding is
allowed: <= 1e-6 * max(1, |x|).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, replace
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from speedsd.schedulers import SCHEDULERS, SchedulerConfig, alphas_cumprod, make_scheduler
from speedsd.schedulers.base import SD_V1
from speedsd.schedulers.ddim import DDIMScheduler

# diffusers' own numpy-2 __array__ deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

TOL = 1e-6
SHAPE = (2, 4, 8, 8)  # [B, C, h, w] latents

_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True, "solver_type": "midpoint"}
# label -> (our scheduler name, our config overrides, diffusers class, extra diffusers kwargs)
CASES = {
    "pndm": ("pndm", {}, diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    "ddim": ("ddim", {}, diffusers.DDIMScheduler, {}),
    "euler": ("euler", {}, diffusers.EulerDiscreteScheduler, {}),
    "euler_karras": ("euler", {"use_karras_sigmas": True}, diffusers.EulerDiscreteScheduler, {}),
    "euler_a": ("euler_a", {}, diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": ("dpmpp_2m", {}, diffusers.DPMSolverMultistepScheduler, _DPM),
    "dpmpp_2m_karras": (
        "dpmpp_2m_karras",
        {},
        diffusers.DPMSolverMultistepScheduler,
        {**_DPM, "use_karras_sigmas": True},
    ),
}
SPACINGS = ("leading", "trailing", "linspace")
# DPM++ Karras ignores timestep_spacing (sigmas span the whole training range)
MAIN_PARAMS = [
    pytest.param(label, pred, steps, spacing, id=f"{label}-{pred}-{steps}-{spacing}")
    for label in CASES
    for pred in ("epsilon", "v_prediction")
    for steps in (10, 20, 25)
    for spacing in (("leading",) if label == "dpmpp_2m_karras" else SPACINGS)
]


def build(label: str, cfg: SchedulerConfig):
    """(ours, diffusers) schedulers of the same config."""
    name, overrides, cls, extra = CASES[label]
    cfg = replace(cfg, **overrides)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in asdict(cfg).items() if k in accepted}
    return make_scheduler(name, cfg), cls(**{**kwargs, **extra})


def fake_unet(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + math.sin(float(t) / 97.0) * r


def max_err(a: torch.Tensor, b: torch.Tensor, rel: bool = False) -> float:
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = b.abs().clamp(min=1.0) if rel else 1.0
    return float(((a.double() - b.double()).abs() / scale).max())


def denoise_both(ours, theirs, timesteps, x, *, seed=None, step_kwargs=None, rel=False) -> float:
    """Run both loops over ``timesteps`` from x; assert and return the worst per-step error."""
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype) + 0.25
    gen_a = torch.Generator().manual_seed(seed) if seed is not None else None
    gen_b = torch.Generator().manual_seed(seed) if seed is not None else None
    xa, xb, worst = x.clone(), x.clone(), 0.0
    for i, t in enumerate(timesteps):
        ina, inb = ours.scale_model_input(xa, t), theirs.scale_model_input(xb, t)
        e_in = max_err(ina, inb, rel)
        kw = dict(step_kwargs or {})
        if gen_b is not None:
            kw["generator"] = gen_b
        xa = ours.step(fake_unet(ina, t, r), t, xa, generator=gen_a)
        xb = theirs.step(fake_unet(inb, t, r), t, xb, **kw).prev_sample
        e = max(e_in, max_err(xa, xb, rel))
        assert torch.isfinite(xa).all()
        assert e <= TOL, f"step {i} (t={float(t)}): max err {e:.3g}"
        worst = max(worst, e)
    return worst


def initial_latents(sigma: float, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.3) * sigma


@pytest.mark.parametrize("label, pred, steps, spacing", MAIN_PARAMS)
def test_matches_diffusers(label, pred, steps, spacing):
    cfg = replace(SD_V1, prediction_type=pred, timestep_spacing=spacing)
    ours, theirs = build(label, cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)
    seed = 11 if label == "euler_a" else None
    denoise_both(ours, theirs, ours.timesteps, initial_latents(ours.init_noise_sigma), seed=seed)


@pytest.mark.parametrize("label", list(CASES))
def test_matches_diffusers_fp32(label):
    ours, theirs = build(label, SD_V1)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x = initial_latents(ours.init_noise_sigma, torch.float32)
    denoise_both(ours, theirs, ours.timesteps, x, seed=5 if label == "euler_a" else None, rel=True)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(eta, pred):
    cfg = replace(SD_V1, prediction_type=pred)
    ours = DDIMScheduler(cfg, eta=eta)
    _, theirs = build("ddim", cfg)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x = initial_latents(1.0)
    denoise_both(ours, theirs, ours.timesteps, x, seed=9, step_kwargs={"eta": eta})


def test_ddim_clip_sample_and_alpha_to_one_match_diffusers():
    cfg = replace(SD_V1, clip_sample=True, set_alpha_to_one=True, beta_schedule="linear", steps_offset=0)
    ours, theirs = build("ddim", cfg)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    denoise_both(ours, theirs, ours.timesteps, initial_latents(1.0) * 3)


def test_dpm_sigma_min_final_matches_diffusers():
    from speedsd.schedulers.dpmpp_2m import DPMPP2MScheduler

    ours = DPMPP2MScheduler(SD_V1, final_sigmas_type="sigma_min")
    _, theirs = build("dpmpp_2m", SD_V1)
    theirs = type(theirs).from_config(theirs.config, final_sigmas_type="sigma_min")
    for steps in (10, 20):  # < 15 steps: first-order last step; >= 15: second order to the end
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(ours.sigmas, theirs.sigmas)
        denoise_both(ours, theirs, ours.timesteps, initial_latents(1.0))


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [10, 25])
def test_img2img_matches_diffusers(label, strength, steps):
    ours, theirs = build(label, SD_V1)
    ts, t_start = ours.timesteps_for_strength(steps, strength)
    theirs.set_timesteps(steps)
    fake_pipe = SimpleNamespace(scheduler=theirs)
    ts_ref, n_left = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    assert torch.equal(ts, ts_ref)
    assert t_start == steps - n_left
    assert t_start == steps - int(steps * strength)

    init = initial_latents(1.0) * 0.5
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    latent_t = ts[:1].repeat(SHAPE[0])  # as the img2img pipeline does
    xa, xb = ours.add_noise(init, noise, latent_t), theirs.add_noise(init, noise, latent_t)
    assert max_err(xa, xb) <= TOL
    assert max_err(xa, init) > 0.05  # it did add noise
    denoise_both(ours, theirs, ts, xb, seed=2 if label == "euler_a" else None)


@pytest.mark.parametrize("label", list(CASES))
def test_add_noise_matches_diffusers(label):
    ours, theirs = build(label, replace(SD_V1, prediction_type="v_prediction"))
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    init = initial_latents(1.0) * 0.8
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 0.2
    for t in (ours.timesteps[3:5], ours.timesteps[:1], ours.timesteps[-1:].repeat(2)):  # per-batch and shared t
        out = ours.add_noise(init, noise, t)
        assert out.shape == init.shape
        assert max_err(out, theirs.add_noise(init, noise, t)) <= TOL


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(schedule):
    cfg = replace(SD_V1, beta_schedule=schedule)
    ref = diffusers.DDIMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=schedule)
    assert torch.equal(alphas_cumprod(cfg), ref.alphas_cumprod)


def test_set_timesteps_resets_state():
    """Reusing a multistep scheduler after set_timesteps gives the same run as a fresh one."""
    for name in ("pndm", "dpmpp_2m"):
        ours, theirs = build(name, SD_V1)
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        x = initial_latents(1.0)
        denoise_both(ours, theirs, ours.timesteps, x)
        ours.set_timesteps(10)
        theirs = build(name, SD_V1)[1]
        theirs.set_timesteps(10)
        denoise_both(ours, theirs, ours.timesteps, x)


def test_from_diffusers_config():
    sd14 = {  # SD-1.4's scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    assert SchedulerConfig.from_diffusers(sd14) == SD_V1
    v = SchedulerConfig.from_diffusers(
        {**sd14, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "use_karras_sigmas": None}
    )
    assert (v.prediction_type, v.timestep_spacing, v.use_karras_sigmas) == ("v_prediction", "trailing", False)
    with pytest.raises(ValueError, match="trained_betas"):
        SchedulerConfig.from_diffusers({**sd14, "trained_betas": [0.1] * 1000})
    with pytest.raises(ValueError, match="prediction_type"):
        SchedulerConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="beta_schedule"):
        SchedulerConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="timestep_spacing"):
        SchedulerConfig(timestep_spacing="karras")


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match=r"unknown scheduler 'lms'; choose one of: pndm, ddim, euler") as err:
        make_scheduler("lms", SD_V1)
    for name in SCHEDULERS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5])
def test_bad_num_steps(name, bad):
    sched = make_scheduler(name, SD_V1)
    with pytest.raises(ValueError, match="num_steps"):
        sched.set_timesteps(bad)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_bad_strength_and_step_before_set(name):
    sched = make_scheduler(name, SD_V1)
    x = torch.ones(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, 1, x)
    with pytest.raises(ValueError, match="strength"):
        sched.timesteps_for_strength(10, 1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_cuda_matches_cpu(name):
    """Tables stay on the CPU; timesteps, samples and noise live on the GPU (CPU generator, as diffusers)."""
    runs = []
    for device in ("cpu", "cuda"):
        sched = make_scheduler(name, SD_V1)
        sched.set_timesteps(10, device=device)
        assert sched.timesteps.device.type == device
        gen = torch.Generator().manual_seed(1)
        x = initial_latents(sched.init_noise_sigma, torch.float32).to(device)
        r = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(device)
        for t in sched.timesteps:
            x = sched.step(fake_unet(sched.scale_model_input(x, t), t, r), t, x, generator=gen)
        runs.append(x.cpu())
    assert max_err(runs[1], runs[0], rel=True) <= 1e-5
