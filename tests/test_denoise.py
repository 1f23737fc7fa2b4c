"""speedsd.denoise: the eager loop projects the text's cross-attention K/V once per image, and that
changes nothing in the result. (The whole-loop CUDA graph is tested against the step-by-step path in
tests/test_graphs.py on a GPU.)"""

from __future__ import annotations

import contextlib
from unittest.mock import patch

import pytest
import torch

import speedsd
from speedsd import ops
from speedsd.models.layers import CrossKV
from speedsd.models.unet import UNet2DCondition

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_eager_loop_projects_text_once(scheduler: str) -> None:
    flags = ops.PRESETS["reference"].replace(fused_qkv=True)
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float32, flags=flags)
    kw = dict(steps=3, height=32, width=32, seed=7, output="latent", scheduler=scheduler, guidance_scale=5.0)
    calls: list[int] = []
    real = CrossKV.build

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with patch.object(CrossKV, "build", staticmethod(counting)):
        scoped = pipe("a cat", **kw)
        assert len(calls) == 1  # one projection for the whole loop (PNDM: 4 UNet evaluations)
        other = pipe("a dog", **kw)  # a new prompt is projected anew
        assert len(calls) == 2
        with patch.object(UNet2DCondition, "context_scope", lambda self: contextlib.nullcontext()):
            unscoped = pipe("a cat", **kw)
        assert len(calls) == 2 + (4 if scheduler == "pndm" else 3)  # once per UNet evaluation
    torch.testing.assert_close(scoped, unscoped, atol=0, rtol=0)
    assert not torch.equal(scoped, other)
