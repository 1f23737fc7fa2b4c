"""Gluon conv tile configs (kernels/conv_gluon_config.py): the named variants fitted to Co, the string keys'
round trip (the conv table stores them), shared-memory sizes and the validation errors."""

from __future__ import annotations

import dataclasses

import pytest

from speedsd.kernels import conv_gluon_config as cg


@pytest.mark.parametrize("co", [64, 128, 256, 320, 384, 512, 1280])
@pytest.mark.parametrize("name", list(cg.VARIANTS))
def test_variants_fit_co_and_round_trip(name, co):
    cfg = cg.variant(name, co)
    assert co % cfg.bn == 0 and cfg.persistent == (not name.endswith("_np"))
    assert cg.GluonConvConfig.parse(str(cfg)) == cfg and cfg.key() == str(cfg)
    assert cg.resolve(name, co) == cfg and cg.resolve(str(cfg), co) == cfg and cg.resolve(cfg, co) is cfg
    assert cfg.smem_bytes() <= cg.SMEM_LIMIT
    if name.startswith("ws2") and co % 256 and co % 128 == 0:  # 256 pixels x 128 channels
        assert (cfg.th, cfg.tw, cfg.bn) == (16, 16, 128)


def test_split_configs_round_trip():
    cfg = cg.GluonConvConfig(th=16, tw=16, bn=128, stages=3, consumers=2, epi_split=2, split=3)
    assert str(cfg) == "g16x16n128k64s3c2e2sk3p" and cg.GluonConvConfig.parse(str(cfg)) == cfg
    np2 = cg.resolve("g8x16n128k64s4c1e1sk2", 256)
    assert np2.split == 2 and not np2.persistent
    assert str(dataclasses.replace(cfg, split=1)) == "g16x16n128k64s3c2e2p"
    wide = cg.GluonConvConfig(bn=128, bn1=32, stages=5)  # 160 channels a tile
    assert str(wide) == "g8x16n128+32k64s5c1e1p" and cg.GluonConvConfig.parse(str(wide)) == wide
    assert wide.width == 160 and wide.smem_bytes() == 5 * (128 + 160) * 64 * 2 + 128 * 160 * 2 + 2 * 5 * 8
    for bn1 in (8, 48, 256):
        with pytest.raises(ValueError, match="bn1 must be 0 or a power of 2"):
            cg.GluonConvConfig(bn=128, bn1=bn1)
    bad_keys = ("g16x16n128k64s3c2e2sk1p", "g16x16n128k64s3c2e2sk0p", "g16x16n128k64s3c2e2skp", "g8x8n64+0k64s4c1e1p")
    for bad in bad_keys:
        with pytest.raises(ValueError, match="not a Gluon conv config"):
            cg.GluonConvConfig.parse(bad)
    assert cfg.smem_bytes() == 3 * (256 + 128) * 64 * 2 + 256 * 64 * 4 + 2 * 3 * 8  # fp32 partial slabs
    with pytest.raises(ValueError, match="shared memory"):
        dataclasses.replace(cfg, stages=4)


def test_named_configs():
    assert str(cg.VARIANTS["ws2"]) == "g8x16n256k64s4c2e2p" and str(cg.VARIANTS["ws_np"]) == "g8x16n128k64s4c1e1"
    assert cg.resolve(None, 512) == cg.VARIANTS[cg.DEFAULT_VARIANT]
    for bad in ("ws3", "g8x16n256k64s4c2e2q", "m64n128k128s4w4p3", ""):
        with pytest.raises(ValueError):
            cg.resolve(bad, 256)
    with pytest.raises(ValueError, match="Co=96"):
        cg.variant("ws2", 96)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(bk=16), "bk 32 or 64"),
        (dict(tw=12), "powers of 2"),
        (dict(th=2, tw=8), "multiple of 64"),
        (dict(consumers=3), "1 or 2 consumer"),
        (dict(consumers=2, th=4), "multiple of 64"),
        (dict(bn=512), "bn 16..256"),
        (dict(stages=2), ">= 3 stages"),
        (dict(epi_split=3), "powers of 2"),
        (dict(bn=32, epi_split=4), "slabs of >= 16"),
        (dict(bn=256, consumers=2, stages=5), "shared memory"),
        (dict(split=0), "split must be >= 1"),
        (dict(bn=256, consumers=2, epi_split=2, split=2), "shared memory"),  # fp32 partial slabs: 4 bytes each
    ],
)
def test_invalid_configs_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        cg.GluonConvConfig(**fields)


# ---- launcher checks and predicate -----------------------------------------------------------------
