"""GroupNorm(+SiLU) read straight from a K-split conv's fp32 partials (kernels/group_norm_partials.py): against
fp64 torch on the summed partials, at most 2x the error of the path it replaces (the partials summed to fp16,
then the one-source GroupNorm kernel with the same pre-add), on small UNet-like and odd shapes.

Runs under the Triton interpreter on CPU, on the GPU where there is one.
"""

from __future__ import annotations

import pytest
import torch

from speedsd.kernels import group_norm_partials as gp
from speedsd.kernels.group_norm import group_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (label, (N, C, H, W), groups, splits, add: None | "c" | "nc")
CASES = [
    ("unet-like 8² 2x(32 groups of 2) split 5, [N, C] add", (2, 64, 4, 4), 32, 5, "nc"),
    ("CPG 3, 5x7 pixels, split 2, [C] add", (1, 96, 5, 7), 32, 2, "c"),
    ("CPG 5 (not a power of 2), split 4, no add", (2, 40, 3, 3), 8, 4, None),
    ("CPG 40 (the UNet's 1280 / 32) as 2x(4 groups of 40), split 3", (2, 160, 2, 4), 4, 3, "nc"),
]


def _inputs(shape, groups, splits, add_kind, seed):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    parts = (torch.randn(splits, n * h * w, c, generator=g) * 3 + 0.4).to(DEVICE)
    add = {None: None, "c": torch.randn(c, generator=g) + 0.5, "nc": torch.randn(n, c, generator=g) - 0.3}[add_kind]
    weight = (torch.randn(c, generator=g) * 0.2 + 1.0).half().to(DEVICE)
    bias = (torch.randn(c, generator=g) * 0.2 + 0.1).half().to(DEVICE)
    return parts, (None if add is None else add.to(DEVICE)), weight, bias


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no-silu"])
@pytest.mark.parametrize("label, shape, groups, splits, add_kind", CASES, ids=[c[0] for c in CASES])
def test_matches_fp64_within_2x_the_replaced_path(label, shape, groups, splits, add_kind, silu):
    parts, add, weight, bias = _inputs(shape, groups, splits, add_kind, seed=len(label))
    y = gp.group_norm_partials(parts, shape, groups, weight, bias, 1e-6, silu, add=add)
    assert y is not None and y.shape == shape and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.isnan().any()
    ref = gp.group_norm_partials_ref(parts.double(), shape, groups, weight, bias, 1e-6, silu, add)
    n, c, h, w = shape
    summed = parts.sum(0).half().view(n, h, w, c).permute(0, 3, 1, 2)  # the second launch's fp16 output
    old = group_norm(summed, groups, weight, bias, 1e-6, silu, add=add)
    err, err_old = (y.double() - ref).abs().max().item(), (old.double() - ref).abs().max().item()
    assert err <= 2 * err_old + 1e-6, (err, err_old)


def test_plan_and_refusals(monkeypatch):
    parts, _, weight, bias = _inputs((2, 64, 4, 4), 32, 3, None, seed=1)
    assert gp.partials_plan(2, 64, 16, 32, torch.float16, parts.device) is not None
    assert gp.partials_plan(2, 64, 16, 3, torch.float16, parts.device) is None  # 3 groups do not divide 64
    with pytest.raises(ValueError, match="parts must be"):
        gp.group_norm_partials(parts.half(), (2, 64, 4, 4), 32)
    with pytest.raises(ValueError, match="parts must be"):
        gp.group_norm_partials(parts, (2, 64, 4, 5), 32)
    with pytest.raises(ValueError, match="weight must be"):
        gp.group_norm_partials(parts, (2, 64, 4, 4), 32, weight[:32])
    with pytest.raises(ValueError, match="dtype"):
        gp.group_norm_partials(parts, (2, 64, 4, 4), 32, dtype=torch.int8)
    split_plan = gp.plan_group_norm(2, 64, 16, 32, True, 2, 132, "split")
    monkeypatch.setattr(gp, "plan_for", lambda *a: split_plan)  # GroupNorm would take two launches here
    assert gp.partials_plan(2, 64, 16, 32, torch.float16, parts.device) is None
    assert gp.group_norm_partials(parts, (2, 64, 4, 4), 32, weight, bias) is None
