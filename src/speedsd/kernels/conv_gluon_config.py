"""Tile configs of the Gluon 3x3 conv (kernels/conv_gluon.py): :class:`GluonConvConfig`, its string keys (the
per-card conv table stores configs as these), and the named variants."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

SMEM_LIMIT = 232448  # bytes of dynamic shared memory a CTA may use on sm_90 (227 KiB)
PRODUCER_REGS = 40  # setmaxnreg of the 1-warp TMA producer


@dataclass(frozen=True)
class GluonConvConfig:
    """An output tile of th x tw pixels by bn channels, K steps of bk channels through a `stages`-deep SMEM
    ring, `consumers` warpgroups (4 warps each, stacked along the pixels) on one tile, `persistent`: one
    program per SM walking the tiles (else one tile per program), `epi_split`: the epilogue stores the tile
    in that many column slabs (less SMEM for the output buffer), `split`: K splits per tile (> 1: each
    (tile, split) unit stores an fp32 partial and a second kernel sums them; for convs with too few tiles
    to fill the SMs), `tb`: images per tile (> 1 where an image is smaller than the tile: the UNet's 8² convs
    then take both CFG halves in one 128-row tile, so each unit streams its weight slice once, not per image),
    `bn1`: the tile is bn + bn1 channels wide, the last bn1 in a second accumulator (0: none; e.g. Co = 320 as
    two tiles of 128 + 32, so a 64² UNet conv is one wave of 128 units). A split runs K steps (9 per channel
    block), so up to 9·C / bk splits."""

    th: int = 8
    tw: int = 16
    bn: int = 128
    bk: int = 64
    stages: int = 4
    consumers: int = 1
    persistent: bool = True
    epi_split: int = 1
    split: int = 1
    tb: int = 1
    bn1: int = 0

    def __post_init__(self) -> None:
        if self.tb not in (1, 2, 4):
            raise ValueError(f"{self}: tb (images per tile) must be 1, 2 or 4")
        pow2 = all(v > 0 and v & (v - 1) == 0 for v in (self.th, self.tw, self.bn, self.epi_split))
        if not pow2 or self.tw % 8 or self.bk not in (32, 64) or not 16 <= self.bn <= 256:
            raise ValueError(f"{self}: th, tw, bn, epi_split powers of 2, tw % 8 == 0, bk 32 or 64, bn 16..256")
        if self.consumers not in (1, 2) or self.bm % (64 * self.consumers) or self.bm > 256:
            raise ValueError(f"{self}: 1 or 2 consumer warpgroups of a multiple of 64 pixels each, <= 256 pixels")
        if self.stages < 3 or self.bn % self.epi_split or self.bn // self.epi_split < 16:
            raise ValueError(f"{self}: >= 3 stages; epi_split must leave slabs of >= 16 channels")
        if self.split < 1:
            raise ValueError(f"{self}: split must be >= 1")
        if self.bn1 and (self.bn1 & (self.bn1 - 1) or not 16 <= self.bn1 <= self.bn):
            raise ValueError(f"{self}: bn1 must be 0 or a power of 2 in 16..bn")
        if self.smem_bytes() > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem_bytes()} B of shared memory (> {SMEM_LIMIT})")

    @property
    def bm(self) -> int:  # output pixels per tile (the GEMM's M)
        return self.tb * self.th * self.tw

    @property
    def width(self) -> int:  # output channels per tile (the GEMM's N)
        return self.bn + self.bn1

    @property
    def warps(self) -> int:
        return 4 * self.consumers

    def smem_bytes(self) -> int:
        ring = self.stages * (self.bm + self.width) * self.bk * 2
        out_bytes = 4 if self.split > 1 else 2  # the output slab: fp32 partials with a K split, else fp16
        return ring + self.bm * (self.bn // self.epi_split + self.bn1) * out_bytes + 2 * self.stages * 8

    def __str__(self) -> str:
        p = "p" if self.persistent else ""
        sk = f"sk{self.split}" if self.split > 1 else ""
        tb = f"b{self.tb}" if self.tb > 1 else ""
        n = f"{self.bn}+{self.bn1}" if self.bn1 else f"{self.bn}"
        return f"g{self.th}x{self.tw}{tb}n{n}k{self.bk}s{self.stages}c{self.consumers}e{self.epi_split}{sk}{p}"

    def key(self) -> str:
        return str(self)

    @staticmethod
    def parse(key: str) -> GluonConvConfig:
        """Inverse of ``str`` (the per-card conv table stores configs as these strings)."""
        m = re.fullmatch(r"g(\d+)x(\d+)(?:b(\d+))?n(\d+)(?:\+(\d+))?k(\d+)s(\d+)c(\d+)e(\d+)(?:sk(\d+))?(p?)", key)
        # (a default has no suffix: one key a config)
        if m is None or m.group(10) in ("0", "1") or m.group(3) in ("0", "1") or m.group(5) == "0":
            raise ValueError(f"not a Gluon conv config key: {key!r}")
        th, tw, bn = int(m.group(1)), int(m.group(2)), int(m.group(4))
        bk, stages, consumers, epi_split = map(int, m.groups()[5:9])
        return GluonConvConfig(th, tw, bn, bk, stages, consumers, persistent=m.group(11) == "p", epi_split=epi_split,
                               split=int(m.group(10) or 1), tb=int(m.group(3) or 1),
                               bn1=int(m.group(5) or 0))  # fmt: skip


# Named variants, as measured by the prototype. 'ws': one consumer warpgroup on 128 pixels (8 x 16) x 128
# channels; 'ws2': two on 128 pixels x 256 channels (each warpgroup 64 x 256: 128 accumulator registers a
# thread), stored in two 128-channel slabs; '_np': one tile per program instead of persistent.
_WS = GluonConvConfig()
_WS2 = GluonConvConfig(bn=256, consumers=2, epi_split=2)
VARIANTS: dict[str, GluonConvConfig] = {
    "ws": _WS,
    "ws_np": dataclasses.replace(_WS, persistent=False),
    "ws2": _WS2,
    "ws2_np": dataclasses.replace(_WS2, persistent=False),
}
DEFAULT_VARIANT = "ws2"


def variant(name: str, co: int) -> GluonConvConfig:
    """The named variant fitted to Co output channels: bn 256 -> 128 pixels (16 x 16) x 128 channels where
    only 128 divides Co (the same 256-pixel x 128 wgmma work per tile); bn -> 128 or 64 otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Gluon conv variant {name!r}; one of {sorted(VARIANTS)}")
    cfg = VARIANTS[name]
    if co % cfg.bn == 0:
        return cfg
    if cfg.consumers == 2 and co % 128 == 0:
        return dataclasses.replace(cfg, th=16, tw=16, bn=128)
    for bn in (128, 64):
        if co % bn == 0:
            return dataclasses.replace(cfg, bn=bn, epi_split=1)
    raise ValueError(f"no {name} tile divides Co={co} (Co must be a multiple of 64)")


def resolve(config: GluonConvConfig | str | None, co: int) -> GluonConvConfig:
    """A config: itself, a VARIANTS name fitted to Co (None: DEFAULT_VARIANT), or a ``str(config)`` key."""
    if isinstance(config, GluonConvConfig):
        return config
    if config is None or config in VARIANTS:
        return variant(config or DEFAULT_VARIANT, co)
    return GluonConvConfig.parse(config)
