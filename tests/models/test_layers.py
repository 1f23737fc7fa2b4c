"""Shared layers: the fused QKV projection holds no second copy of the weights and follows reloads."""

from __future__ import annotations

import torch

from speedsd import ops
from speedsd.models.layers import Attention


def _attn(bias: bool) -> Attention:
    torch.manual_seed(0)
    a = Attention(32, heads=2, dim_head=16, bias=bias)
    for p in a.parameters():
        torch.nn.init.normal_(p, 0.3, 0.5)
    return a.eval()


def test_fused_qkv_matches_separate_and_shares_storage():
    for bias in (False, True):
        a = _attn(bias)
        x = torch.randn(2, 7, 32) + 0.5
        with ops.using(ops.Flags(attention="sdpa")):
            want = a(x)
        with torch.inference_mode(), ops.using(ops.Flags(attention="sdpa", fused_qkv=True)):
            got = a(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w, b = a._fused_qkv_weight()
        storage = w.untyped_storage().data_ptr()
        for i, proj in enumerate((a.to_q, a.to_k, a.to_v)):
            assert proj.weight.untyped_storage().data_ptr() == storage  # a view, not a copy
            assert isinstance(proj.weight, torch.nn.Parameter)
            torch.testing.assert_close(w[32 * i : 32 * (i + 1)], proj.weight)
        assert (b is None) == (not bias)
        # state-dict keys unchanged
        assert {"to_q.weight", "to_k.weight", "to_v.weight"} <= set(a.state_dict())


def test_fused_qkv_sees_in_place_reload_and_rebuilds_after_replacement():
    a = _attn(False)
    x = torch.randn(1, 5, 32) + 0.5
    flags = ops.Flags(attention="sdpa", fused_qkv=True)
    with ops.using(flags):
        a(x)  # fuse
    new = {k: torch.randn_like(v) for k, v in a.state_dict().items()}
    a.load_state_dict(new)  # copies into the views
    with ops.using(flags):
        got = a(x)
    with ops.using(ops.Flags(attention="sdpa")):
        want = a(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a.to(torch.float64)  # replaces every parameter: the fused weight must be rebuilt
    with ops.using(flags):
        got = a(x.double())
    with ops.using(ops.Flags(attention="sdpa")):
        want = a(x.double())
    torch.testing.assert_close(got, want)
    assert a._fused_qkv_weight()[0].dtype == torch.float64
