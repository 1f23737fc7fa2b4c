"""The probe's kernel variants on CPU (Triton interpreter): each gives the GroupNorm statistics (or, with
the group reduction off, per-channel partials that merge to them). Run with --import-mode=importlib."""

import pytest
import torch
import triton
from probe import variant


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (1, 96, 5, 7)], ids=["2x64x8²", "1x96x5x7"])
@pytest.mark.parametrize("kw", [{}, {"unroll": False}, {"shift": False}], ids=["unroll", "loop", "noshift"])
def test_variant_stats(shape: tuple[int, int, int, int], kw: dict) -> None:
    g = 32
    x = (torch.randn(shape) * 2 + 0.5).to(torch.float16).to(memory_format=torch.channels_last)
    st = variant(x, g, chunks=4, block_s=4, warps=4, **kw)
    ref = x.float().reshape(shape[0], shape[1], -1).transpose(1, 2).reshape(shape[0], -1, g, shape[1] // g)
    ref = ref.transpose(1, 2).reshape(shape[0], g, -1)
    torch.testing.assert_close(st[:, 0, :g], ref.mean(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st[:, 1, :g], ref.var(-1, unbiased=False), atol=1e-3, rtol=1e-3)
    assert triton.next_power_of_2(g) == st.shape[-1]
