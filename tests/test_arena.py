"""speedsd.arena: every floating-point weight of a model in one buffer, fusion groups back to back,
4-D weights in the requested layout; relayout in place; loaders fill the arena."""

from __future__ import annotations

import pytest
import torch

import speedsd
from checkpoints import make_diffusers_folder
from interp_bounds import needs_interpreter
from speedsd import arena, ops
from speedsd.loading import _meta_modules
from speedsd.models.clip import CLIP_PRESETS
from speedsd.models.layers import fused_rows
from speedsd.models.unet import UNET_PRESETS
from speedsd.models.vae import VAE_PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_meta() -> dict[str, torch.nn.Module]:
    return _meta_modules(
        {"text_encoder": CLIP_PRESETS["tiny"], "unet": UNET_PRESETS["tiny"], "vae": VAE_PRESETS["tiny"]}
    )


def _one_buffer(model: torch.nn.Module) -> int:
    """The one storage every floating-point parameter lives in (asserts there is exactly one)."""
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters() if p.is_floating_point()}
    assert len(ptrs) == 1, f"{len(ptrs)} storages"
    return ptrs.pop()


@pytest.mark.parametrize("comp", ["text_encoder", "unet", "vae"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_allocate_layout(comp: str, channels_last: bool, dtype: torch.dtype) -> None:
    model = _tiny_meta()[comp]
    slots, buf = arena.allocate(model, "cpu", dtype, channels_last=channels_last)
    state = model.state_dict()
    assert slots.keys() == state.keys()
    assert buf is not None and buf.dtype == torch.uint8
    spans = []
    for k, t in slots.items():
        assert t.shape == state[k].shape and t.dtype == dtype
        assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        if t.dim() == 4:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert t.is_contiguous(memory_format=fmt)
        else:
            assert t.is_contiguous()
        start = t.data_ptr() - buf.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), k))
    spans.sort()
    for (_, a1, ka), (b0, _, kb) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{ka} overlaps {kb}"
    assert spans[-1][1] <= buf.numel()
    for group in arena.weight_groups(model):  # back to back, in order
        ends = [slots[k].data_ptr() + slots[k].numel() * slots[k].element_size() for k in group]
        assert [slots[k].data_ptr() for k in group[1:]] == ends[:-1]
        assert (slots[group[0]].data_ptr() - buf.data_ptr()) % arena.ALIGN == 0
    for _, _, k in spans:
        if not any(k in g[1:] for g in arena.weight_groups(model)):
            assert (slots[k].data_ptr() - buf.data_ptr()) % arena.ALIGN == 0, k


def test_groups_cover_the_fusions() -> None:
    unet = _tiny_meta()["unet"]
    keys = {k for g in arena.weight_groups(unet) for k in g}
    assert {f"{n}.to_q.weight" for n, _ in unet.named_modules() if n.endswith("attn1")} <= keys
    assert {f"{n}.to_k.weight" for n, _ in unet.named_modules() if n.endswith("attn2")} <= keys
    assert not {f"{n}.to_q.weight" for n, _ in unet.named_modules() if n.endswith("attn2")} & keys
    assert {f"{n}.time_emb_proj.weight" for n, m in unet.named_modules() if hasattr(m, "time_emb_proj")} <= keys


def test_bad_groups() -> None:
    with pytest.raises(ValueError, match="two fusion groups"):
        arena._layout_order(["a", "b"], [["a"], ["a", "b"]])
    with pytest.raises(ValueError, match="does not have"):
        arena._layout_order(["a"], [["a", "zz"]])


def test_fused_rows_view_when_adjacent() -> None:
    buf = torch.randn(10, 4) + 0.5
    a, b, c = buf[0:3], buf[3:5], buf[5:10]
    fused = fused_rows([a, b, c])
    assert fused.data_ptr() == buf.data_ptr() and fused.shape == (10, 4)
    torch.testing.assert_close(fused, buf, atol=0, rtol=0)
    apart = [torch.nn.Parameter(buf[0:3].clone()), torch.nn.Parameter(buf[5:10].clone())]
    fused2 = fused_rows(apart)  # not adjacent: concatenated, and the parameters re-pointed into it
    assert apart[1].data_ptr() == fused2.data_ptr() + 3 * 4 * 4
    torch.testing.assert_close(fused2, torch.cat([buf[0:3], buf[5:10]]), atol=0, rtol=0)


@needs_interpreter
def test_random_load_one_buffer_and_fused_views() -> None:
    pipe = speedsd.load(
        "random:tiny",
        device="cpu",
        dtype=torch.float32,
        flags=ops.PRESETS["reference"].replace(fused_qkv=True, fused_epilogues=True),
    )
    ptrs = {m: _one_buffer(m) for m in pipe.models()}
    pipe("a cat", steps=2, height=32, width=32, seed=0, output="latent")
    for m in pipe.models():  # the run-time fusions were views: still one buffer, nothing re-pointed
        assert _one_buffer(m) == ptrs[m]
    fused = [a._qkv[0] for a in pipe.unet.modules() if getattr(a, "_qkv", None) is not None]
    assert fused, "no self-attention ran fused"
    assert all(w.untyped_storage().data_ptr() == ptrs[pipe.unet] for w in fused)
    for cache in (pipe.unet._kv_cache, pipe.unet._temb_cache):
        assert cache["w"].untyped_storage().data_ptr() == ptrs[pipe.unet]


def test_diffusers_folder_load_fills_arena(tmp_path) -> None:
    folder = make_diffusers_folder(tmp_path, kind="sd1")
    pipe = speedsd.load(str(folder), device="cpu", dtype=torch.float16)
    from safetensors.torch import load_file

    want = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    got = pipe.unet.state_dict()
    _one_buffer(pipe.unet)
    assert want.keys() == got.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.to(torch.float16), atol=0, rtol=0)


def test_relayout_in_place() -> None:
    pipe = speedsd.load("random:tiny", device="cpu", dtype=torch.float32)
    vae = pipe.vae
    ptr = _one_buffer(vae)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(1, 4, 8, 8) + 0.3
    with ops.using(ops.PRESETS["reference"]):
        ref = vae.decode(z)
    n = arena.relayout(vae, torch.channels_last)
    assert n == sum(p.dim() == 4 and p.shape[2:] != (1, 1) for p in vae.parameters())  # 1x1 kernels are both
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in vae.parameters() if p.dim() == 4)
    assert _one_buffer(vae) == ptr
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    with ops.using(ops.PRESETS["reference"]):
        torch.testing.assert_close(vae.decode(z), ref, atol=1e-5, rtol=1e-5)
    arena.relayout(vae, torch.contiguous_format)
    assert all(p.is_contiguous() for p in vae.parameters())
    assert _one_buffer(vae) == ptr
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
