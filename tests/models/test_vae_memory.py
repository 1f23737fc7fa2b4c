"""The VAE decoder's peak live activation memory, and the image bit-identical to the plain order (phase by phase:
the same to rounding, the upsampler's GroupNorm statistics summed in another order).

The decoder hands its own activations down in Owned boxes (blocks overwrite and free them), norm2
writes over conv1's output, and the big upsampler runs one phase at a time. Live bytes are counted
on CPU (tests/memory_tracker.py) on a small decoder with SD's structure: its last level starts with a
conv-shortcut block (16 -> 8 channels) right after the last upsampler, like SD's 256 -> 128 at 512².
The bounds come from the tensor sizes at that level. SD's own geometry at 512² is sized on the meta
device (shapes, no data), with the Triton launchers replaced by shape-only stand-ins.
"""

from __future__ import annotations

import pytest
import torch

from interp_bounds import needs_interpreter
from memory_tracker import LiveBytes
from speedsd import ops
from speedsd.kernels import subpixel_conv as sc
from speedsd.kernels.subpixel_weight import subpixel_weight_ref
from speedsd.models.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, sample_size=64)
FUSED = ops.PRESETS["fast"].replace(cuda_graphs=False)  # the GPU path: kernels, fused epilogues, sub-pixel
# The decoder body's orders, measured without the narrow output-head conv: at this size its fp32 tap
# products (27 values a pixel) outweigh the 8-channel activations and would set every order's peak.
# At SD's size they do not (test_sd_decoder_at_512_peak_live_bytes, with the head on).
BODY = FUSED.replace(igemm_conv=False)
LATENT = 8  # -> a 64x64 image
ORDERS = {"plain": (False, False), "owned": (True, False), "phases": (False, True), "both": (True, True)}


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(1)
    model = AutoencoderKL(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.02)
    return model.to(memory_format=torch.channels_last)


def _latents() -> torch.Tensor:
    return (torch.randn(1, CFG.latent_channels, LATENT, LATENT) * 2 + 0.5).contiguous(memory_format=torch.channels_last)


def _decode(vae: AutoencoderKL, z: torch.Tensor, order: str, monkeypatch) -> tuple[torch.Tensor, int]:
    consume, phases = ORDERS[order]
    vae.decoder.consume = consume
    monkeypatch.setattr(sc, "PHASE_SPLIT_BYTES", 0 if phases else 2**62)
    with LiveBytes() as mem:
        y = vae.decode(z)
    return y, mem.peak


@needs_interpreter
@torch.inference_mode()
def test_decoder_peak_live_bytes_and_bit_identity(vae, monkeypatch):
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)  # the sub-pixel upsamplers at these small sizes too
    z = _latents()
    z0 = z.clone()
    with ops.using(BODY):
        vae.decode(z)  # warm: the weight folds of the first call are not activations
        out = {order: _decode(vae, z, order, monkeypatch) for order in ORDERS}
    vae.decoder.consume = True
    peaks = {order: peak for order, (_, peak) in out.items()}
    for order, (_, phases) in ORDERS.items():  # the Owned hand-over changes no value; the phase split changes
        same = out["phases" if phases else "plain"][0]  # only how the upsampler's statistics are summed
        assert torch.equal(out[order][0], same), order
    torch.testing.assert_close(out["phases"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(z, z0)

    e, hw = 4, (LATENT * CFG.downscale) ** 2  # fp32, the last level's pixels
    c_in, c_out = CFG.block_out_channels[1], CFG.block_out_channels[0]  # the last level's first block
    X, U = c_in * hw * e, c_out * hw * e  # its input (the last upsampler's output), one of its outputs
    P = 4 * c_in * (LATENT * CFG.downscale // 2 + 1) ** 2 * e  # the last upsampler's four phases
    upsample_one_conv = X // 4 + P + X  # its input, P and its output at once
    held = X + 3 * U  # the decoder frame holds X while the level's identity block runs conv2
    assert peaks["plain"] >= max(upsample_one_conv, held), peaks
    assert peaks["owned"] >= upsample_one_conv and peaks["phases"] >= held, peaks
    # both: the peak is the first block of the last level: x (normalised in place), the shortcut, conv1's output
    assert X + 2 * U <= peaks["both"] <= (X + 2 * U) * 1.01, (peaks, X + 2 * U)
    assert peaks["both"] < min(peaks["owned"], peaks["phases"]) <= max(peaks["owned"], peaks["phases"]) < peaks["plain"]


@needs_interpreter
@torch.inference_mode()
def test_encoder_leaves_the_image_unchanged(vae):
    image = (torch.rand(1, 3, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
    image0 = image.clone()
    with ops.using(FUSED):
        mean, _ = vae.encode(image)
    assert torch.equal(image, image0) and mean.shape == (1, 4, LATENT, LATENT)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.inference_mode()
def test_reference_flags_consume_is_bit_identical(vae, layout):
    """Plain torch ops (no kernels: the boxes only change when tensors are freed)."""
    z = _latents() if layout == "channels_last" else _latents().contiguous()
    flags = ops.Flags(channels_last=layout == "channels_last", attention="sdpa")
    with ops.using(flags):
        vae.decoder.consume = False
        want = vae.decode(z)
        vae.decoder.consume = True
        got = vae.decode(z)
    assert torch.equal(got, want)


def _shape_only_kernels(monkeypatch) -> dict[str, int]:
    """Meta tensors cannot run kernels: the launchers become stand-ins that allocate what the real ones
    do (their output, or nothing with ``out=``). GroupNorm's split partials (KiBs) are left out.
    Returns the narrow conv's call count."""
    calls = {"narrow": 0}

    def gn(x, *args, out=None, **kwargs):
        return torch.empty_like(x) if out is None else out

    def add(x, *args, out=None, **kwargs):
        return torch.empty_like(x) if out is None else out

    def interleave(p, bias, *, phase=None, out=None):
        n, c, h1, w1 = p.shape
        shape = (n, c // (4 if phase is None else 1), 2 * h1 - 2, 2 * w1 - 2)
        return torch.empty(shape, dtype=p.dtype, device=p.device) if out is None else out

    def narrow(x, weight, bias=None, **kwargs):  # the two-pass narrow conv: fp32 tap products, then y
        n, _, h, w = x.shape
        co = weight.shape[0]
        calls["narrow"] += 1
        taps = torch.empty((n * h * w, 9 * co), dtype=torch.float32, device=x.device)
        y = torch.empty((n, co, h, w), dtype=x.dtype, device=x.device)
        del taps
        return y

    def scale_shift(x, *args):
        return torch.empty(x.shape[:2], device=x.device), torch.empty(x.shape[:2], device=x.device)

    real = sc.subpixel_upsample_conv
    monkeypatch.setattr(ops, "conv3x3_narrow", narrow)
    monkeypatch.setattr(ops, "group_norm_scale_shift", scale_shift)
    monkeypatch.setattr(ops, "group_norm", gn)
    monkeypatch.setattr(ops, "bias_add", add)
    monkeypatch.setattr(ops, "add_with_group_norm_stats", add)
    # (statistics for the next GroupNorm: KiBs, and the GroupNorm stand-in ignores them)
    monkeypatch.setattr(ops, "subpixel_upsample_conv", lambda x, w4, b, **kw: real(x, w4, b, interleave=interleave))
    monkeypatch.setattr(sc, "_is_channels_last", lambda t: True)  # meta convs drop channels_last strides
    monkeypatch.setattr(ops, "subpixel_weight", subpixel_weight_ref)  # the fold kernel's torch twin (same shape)
    return calls


@needs_interpreter  # (the kernel flags need it to dispatch on non-CUDA tensors)
def test_sd_decoder_at_512_peak_live_bytes(monkeypatch):
    """SD's VAE at 512², fp16: 6 -> 4 tensors of [1, 128, 512, 512] (64 MiB) at the peak."""
    calls = _shape_only_kernels(monkeypatch)
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig()).half().eval()
    z = torch.empty(1, 4, 64, 64, dtype=torch.float16, device="meta")
    MiB, split = 2**20, sc.PHASE_SPLIT_BYTES
    peaks = {}
    flags = FUSED.replace(fused_qkv=False)  # (no weight fusion on meta; no conv table entries for it either)
    with torch.inference_mode(), ops.using(flags):
        model.decode(z)
        for order, (consume, phases) in ORDERS.items():
            model.decoder.consume = consume
            monkeypatch.setattr(sc, "PHASE_SPLIT_BYTES", split if phases else 2**62)
            with LiveBytes() as mem:
                model.decode(z)
            peaks[order] = mem.peak / MiB
    u, x = 64, 128  # [1, 128, 512, 512] and the last upsampler's output [1, 256, 512, 512], MiB
    p = 4 * 256 * 257 * 257 * 2 / MiB  # its four phases (129 MiB)
    z_held = 4 * 64 * 64 * 2 / MiB  # post_quant_conv's output, held by decode() around the decoder
    assert peaks["both"] == x + 2 * u + z_held  # 256: x (normalised in place), the shortcut, conv1's output
    assert peaks["owned"] == x / 4 + p + x + z_held  # 289: the last upsampler as one conv
    assert peaks["phases"] == x + 3 * u + z_held  # 320: the last level's input held by the decoder
    assert peaks["plain"] == x / 4 + p + x + u + z_held  # 353: that, and the decoder holds its block's input
    assert calls["narrow"] == 5  # the output head ran the narrow conv (the warm-up + 4 orders): its x
    # (64 MiB), fp32 tap products (27 MiB) and y stay below every order's peak
    # before this order (norm2 not in place either) the level's second block ran conv2 at x + 4u = 384
