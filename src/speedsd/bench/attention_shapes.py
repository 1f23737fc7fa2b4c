"""The attention shapes that speedsd.bench.kernels_attention measures and the auto-attention table records.

Each is (label, B, H, Nq, Nk, D): the UNet's attentions at CFG batch 2 and the VAE mid block's single head,
for SD-1.x at 512² (the engine's benchmark size), prompts of 2 and 3 blocks of 75 tokens, 768², 512x768 and
1024², and SD 2.x at 512² and 768². Labels are unique and name the shape; speedsd.attention_table keys the
entries by (heads, Nq, Nk, head dim).
"""

from __future__ import annotations

# (label, B, H, Nq, Nk, D): UNet at CFG batch 2 with 8 heads, 512² image (64² latent); VAE mid-block.
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("self 4096 d40", 2, 8, 4096, 4096, 40),
    ("cross 4096x77 d40", 2, 8, 4096, 77, 40),
    ("self 1024 d80", 2, 8, 1024, 1024, 80),
    ("cross 1024x77 d80", 2, 8, 1024, 77, 80),
    ("self 256 d160", 2, 8, 256, 256, 160),
    ("cross 256x77 d160", 2, 8, 256, 77, 160),
    ("self 64 d160", 2, 8, 64, 64, 160),
    ("cross 64x77 d160", 2, 8, 64, 77, 160),  # the mid block's cross-attention (8²)
    ("vae mid 4096 d512", 1, 1, 4096, 4096, 512),
]
# prompts read in 2 and 3 blocks of 75 tokens: the cross-attentions over 154 and 231 text tokens
SHAPES += [
    (f"cross {nq}x{77 * k} d{d}", 2, 8, nq, 77 * k, d)
    for k in (2, 3)
    for nq, d in ((4096, 40), (1024, 80), (256, 160), (64, 160))
]


def unet_shapes(latent_h: int, latent_w: int, sd2: bool = False) -> list[tuple[str, int, int, int, int, int]]:
    """The UNet's attentions for one latent size: per level (the latent, /2, /4, /8; CFG batch 2) the
    self-attention and the cross-attention over 77 text tokens. SD 1.x: 8 heads of 40, 80, 160, 160; SD 2.x
    (labels "sd2 ..."): 5, 10, 20, 20 heads of 64."""
    out = []
    for level in range(4):
        n = (latent_h >> level) * (latent_w >> level)
        if sd2:
            h, d = (5, 10, 20, 20)[level], 64
            out += [(f"sd2 self {n} h{h} d{d}", 2, h, n, n, d), (f"sd2 cross {n}x77 h{h} d{d}", 2, h, n, 77, d)]
        else:
            h, d = 8, (40, 80, 160, 160)[level]
            out += [(f"self {n} d{d}", 2, h, n, n, d), (f"cross {n}x77 d{d}", 2, h, n, 77, d)]
    return out


def _vae_mid(latent_h: int, latent_w: int) -> tuple[str, int, int, int, int, int]:
    n = latent_h * latent_w
    return (f"vae mid {n} d512", 1, 1, n, n, 512)


# 1024² image: the first UNet level attends over 16384 tokens (materialized variants skipped: 8.6 GB S).
LONG_SHAPES = [("self 16384 d40", 2, 8, 16384, 16384, 40)]
# other image sizes: 768², 512x768 (and 768x512: the same token counts), 1024², each shape once (the sizes
# between take the nearest measured choice: speedsd.attention_table); then SD 2.x: 2.1-base at 512², 2.1
# (768-v) at 768²
_seen = {s[1:] for s in SHAPES + LONG_SHAPES}
for _s in [s for size in ((96, 96), (64, 96), (128, 128)) for s in unet_shapes(*size) + [_vae_mid(*size)]]:
    if _s[1:] not in _seen:
        SHAPES.append(_s)
        _seen.add(_s[1:])
SHAPES += unet_shapes(64, 64, sd2=True) + unet_shapes(96, 96, sd2=True)
