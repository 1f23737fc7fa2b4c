"""speedsd.decode: the whole-or-tiled decode choice and the output conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import speedsd
from checkpoints import make_diffusers_folder
from speedsd import decode


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return speedsd.load(str(make_diffusers_folder(tmp_path_factory.mktemp("sd1"), kind="sd1")), device="cpu")


def test_tiled_decode_choice(pipe, monkeypatch) -> None:
    """tiled_decode None: by latent size (past TILED_DECODE_ABOVE a side); True / False: as asked."""
    used = []
    vae = pipe.vae
    monkeypatch.setattr(vae, "decode", lambda z: used.append("full") or torch.zeros(z.shape[0], 3, 8, 8))
    monkeypatch.setattr(vae, "decode_tiled", lambda z: used.append("tiled") or torch.zeros(z.shape[0], 3, 8, 8))
    side = decode.TILED_DECODE_ABOVE
    small, big = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, side + 1)
    decode.finish(pipe, small, "tensor", None)
    decode.finish(pipe, big, "tensor", None)
    decode.finish(pipe, big, "tensor", False)
    decode.finish(pipe, small, "tensor", True)
    assert used == ["full", "tiled", "full", "tiled"]


def test_outputs(pipe) -> None:
    """ "latent": the latents themselves; "tensor": decoded images in [0, 1]; "pil": PIL images of them."""
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert decode.finish(pipe, z, "latent", None) is z
    images = decode.finish(pipe, z, "tensor", None)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    pils = decode.finish(pipe, z, "pil", None)
    assert len(pils) == 2 and pils[0].size == (8, 8)
    assert abs(float(np.asarray(pils[0]).mean()) / 255 - float(images[0].mean())) < 0.01
