"""The KL autoencoder (VAE) of Stable Diffusion 1.x / 2.x.

Parameter names equal a diffusers ``AutoencoderKL`` state dict (``encoder.down_blocks.0.resnets.0.conv1``,
``decoder.mid_block.attentions.0.to_q`` ...), so a checkpoint's ``vae`` loads strictly. Latents here are
*unscaled*: multiply ``encode``'s sample by ``scaling_factor`` before the UNet and divide by it before
``decode`` (the pipeline's job). Every GroupNorm(+SiLU), 3x3 conv and attention goes through
:mod:`speedsd.ops` via the shared layers.

With ``Flags.channels_last`` the inputs are made channels_last here; convert the module's weights too
(``vae.to(memory_format=torch.channels_last)``) so cuDNN sees one layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speedsd import ops
from speedsd.models.layers import (
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    Owned,
    ResnetBlock2D,
    Upsample2D,
    qkv_groups,
)

_EPS = 1e-6  # every GroupNorm in the SD VAE


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int = 512
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers ``vae/config.json``; raises ValueError for what this module cannot build."""
        n = len(cfg.get("block_out_channels", (64,)))
        down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
        up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"only AutoencoderKL is supported, got {cfg['_class_name']!r}")
        if down != ("DownEncoderBlock2D",) * n or up != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"only DownEncoderBlock2D/UpDecoderBlock2D blocks are supported, got down={down} up={up}")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"only act_fn='silu' is supported, got {cfg['act_fn']!r}")
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise ValueError("per-channel latents_mean/latents_std normalisation is not supported")
        shift = cfg.get("shift_factor")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", (64,))),
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            sample_size=int(cfg.get("sample_size", 32)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        )


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),  # SD 1.x and 2.x share the VAE geometry
    # A stand-in with SD's 8x downscale, for smoke tests and the CPU bench (random:tiny)
    "tiny": VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
}


class MidBlock(nn.Module):
    """ResNet → single-head spatial self-attention → ResNet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])
        attn = [Attention(channels, heads=1, dim_head=channels, bias=True, norm_groups=groups, norm_eps=_EPS)]
        self.attentions = nn.ModuleList(attn if add_attention else [])

    def forward(self, x: torch.Tensor | Owned) -> torch.Tensor:
        """``x`` in an :class:`Owned` box: the block may overwrite and free it (see Decoder.forward)."""
        x = Owned.like(x, self.resnets[0](x))
        for attn in self.attentions:  # (its input is also its residual)
            x = Owned.like(x, attn(Owned.unbox(x)))
        return self.resnets[1](x)


class _Block(nn.Module):
    """A resolution level: ResNets, then an optional resampler (``downsamplers.0`` / ``upsamplers.0``)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS) for i in range(n)]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x: torch.Tensor | Owned) -> torch.Tensor:
        """``x`` in an :class:`Owned` box: the block may overwrite and free it (see Decoder.forward)."""
        resample = hasattr(self, "downsamplers") or hasattr(self, "upsamplers")
        for i, resnet in enumerate(self.resnets):  # the last one feeds a resampling conv, if any
            x = Owned.like(x, resnet(x, hand_over=i < len(self.resnets) - 1 or not resample))
        x = Owned.unbox(x)
        for sampler in getattr(self, "downsamplers", ()):
            x = sampler(x)
        for sampler in getattr(self, "upsamplers", ()):  # the next level's first ResNet normalises its output
            x = sampler(x, next_groups=self.resnets[0].norm1.num_groups)
        return x


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, 2·latent, H/8, W/8] (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Block(chans[max(i - 1, 0)], c, cfg.layers_per_block, g, "down" if i < len(chans) - 1 else None)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, chans[-1], eps=_EPS)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return ops.norm_silu_conv_op(x, self.conv_norm_out, self.conv_out)


class Decoder(nn.Module):
    """[B, latent, h, w] -> [B, 3, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            _Block(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, "up" if i < len(chans) - 1 else None)
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = GroupNorm(g, chans[-1], eps=_EPS)
        self.conv_out = Conv2d(chans[-1], cfg.out_channels, 3, padding=1)
        self.consume = True  # hand activations down in Owned boxes (forward); not a parameter

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Every activation after conv_in is the decoder's own, so with ``consume`` (the default) each
        goes down in an :class:`Owned` box: the blocks overwrite and free their inputs once dead, and
        no caller frame holds them (ResnetBlock2D.forward). SD at 512², fp16: the live peak goes from
        six [1, 128, 512, 512] tensors (384 MiB: the last level's input kept by this frame while its
        second block runs) to four (256 MiB: the last level's first block's x, shortcut and conv1
        output), with the last upsampler run by phases (kernels/subpixel_conv.py). ``consume = False``:
        the plain order, for comparisons (tests, bench/memory_probe); the image is the same."""
        box = Owned if self.consume else _plain
        x = box(self.conv_in(z))
        x = box(self.mid_block(x))
        for block in self.up_blocks:
            x = box(block(x))
        return ops.norm_silu_conv_op(Owned.unbox(x), self.conv_norm_out, self.conv_out, inplace=self.consume)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    def weight_groups(self) -> list[list[str]]:
        """The mid-block attention's Q/K/V rows, fused at run time (see :mod:`speedsd.arena`)."""
        return qkv_groups(self)

    @staticmethod
    def _layout(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if ops.current().channels_last else x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, latent, H/8, W/8], unscaled.

        logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution. A sample is
        ``mean + exp(0.5·logvar)·randn``; SD img2img uses that (or the mean) times scaling_factor.
        """
        h = self.encoder(self._layout(x))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, latent, h, w] -> image [B, 3, 8h, 8w] (roughly in [-1, 1])."""
        z = self._layout(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_sliced(self, z: torch.Tensor) -> torch.Tensor:
        """``decode`` one batch element at a time (lower peak memory for big batches)."""
        return torch.cat([self.decode(z[i : i + 1]) for i in range(z.shape[0])])

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 8) -> torch.Tensor:
        """``decode`` in overlapping latent tiles of ``tile``x``tile``, blended linearly.

        For images larger than the GPU memory allows in one pass. Each tile is decoded on its own (its
        GroupNorm statistics and mid-block attention see only the tile, so it differs slightly from
        ``decode``, most near seams). Where tiles overlap, each output pixel is the weighted mean of the
        tiles covering it, with weights ramping linearly across the overlap. A latent that fits in one
        tile is exactly ``decode``.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile={tile} overlap={overlap}")
        _, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f = self.config.downscale
        rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        out: torch.Tensor | None = None
        weight_sum = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        for i, r0 in enumerate(rows):
            wy = _ramp(i, rows, min(tile, h), f, z.device)  # [th·f]
            for j, c0 in enumerate(cols):
                wx = _ramp(j, cols, min(tile, w), f, z.device)  # [tw·f]
                img = self.decode(z[:, :, r0 : r0 + tile, c0 : c0 + tile]).float()
                if out is None:
                    out = torch.zeros(z.shape[0], img.shape[1], h * f, w * f, device=z.device, dtype=torch.float32)
                wgt = wy[:, None] * wx[None, :]  # [th·f, tw·f]
                ys, xs = slice(r0 * f, r0 * f + img.shape[2]), slice(c0 * f, c0 * f + img.shape[3])
                out[:, :, ys, xs] += img * wgt
                weight_sum[ys, xs] += wgt
        assert out is not None
        return (out / weight_sum).to(z.dtype)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, n), stride tile - overlap, the last one flush
    with the end (so every tile is full size and the last overlap may be wider)."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(i: int, starts: list[int], size: int, f: int, device: torch.device) -> torch.Tensor:
    """1-D blend weights, in pixels, for tile ``i`` of length ``size`` latents starting at ``starts[i]``:
    a linear ramp up across the overlap with the previous tile, down across the overlap with the next,
    1 elsewhere. Two overlapping ramps sum to 1 at every pixel."""
    p = torch.arange(size * f, device=device, dtype=torch.float32) + 0.5  # pixel centres in the tile
    w = torch.ones_like(p)
    ov_prev = (starts[i - 1] + size - starts[i]) * f if i > 0 else 0  # overlap, pixels
    ov_next = (starts[i] + size - starts[i + 1]) * f if i < len(starts) - 1 else 0
    if ov_prev > 0:
        w = torch.minimum(w, p / ov_prev)
    if ov_next > 0:
        w = torch.minimum(w, (size * f - p) / ov_next)
    return w
