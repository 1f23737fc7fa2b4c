"""CUDA-graph replay (speedsd.graphs) and the engine on the GPU: same results as eager, new shapes
re-captured, fidelity against diffusers fp32 within 2x of diffusers' own fp16 error."""

from __future__ import annotations

import pytest
import torch

from speedsd.graphs import GraphCache

pytestmark = pytest.mark.gpu


def test_graph_cache_replays_and_recaptures():
    w = torch.randn(64, 64, device="cuda")

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w + y)

    g = GraphCache(fn)
    for shape in [(8, 64), (8, 64), (3, 64), (8, 64)]:
        x, y = torch.randn(shape, device="cuda") + 0.5, torch.randn(shape[0], 64, device="cuda")
        torch.testing.assert_close(g(x, y), fn(x, y))
    assert g.captures == 2 and len(g) == 2
    w.mul_(2)  # in-place weight update: seen by the replay
    x, y = torch.randn(3, 64, device="cuda"), torch.randn(3, 64, device="cuda")
    torch.testing.assert_close(g(x, y), fn(x, y))


def test_capture_after_runs_new_signatures_eagerly_first():
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x * 2 + 1

    g = GraphCache(fn, capture_after=1)
    x = torch.randn(8, device="cuda") + 0.5
    assert torch.equal(g(x), x * 2 + 1) and g.captures == 0 and len(calls) == 1  # eager
    assert torch.equal(g(x), x * 2 + 1) and g.captures == 1 and len(calls) == 2  # captured: the eager call warmed up
    y = torch.randn(8, device="cuda") - 0.5
    assert torch.equal(g(y), y * 2 + 1) and len(calls) == 2  # replayed: fn not called
    z = torch.randn(5, device="cuda")
    assert torch.equal(g(z), z * 2 + 1) and g.captures == 1 and len(calls) == 3  # new shape: eager again
    g.reset()
    assert torch.equal(g(y), y * 2 + 1) and g.captures == 1 and len(calls) == 4  # after reset: eager first
    g2 = GraphCache(fn, warmup=2, capture_after=1)  # more warm-ups asked than eager calls made: the rest run
    g2(x)
    g2(x)
    assert g2.captures == 1 and len(calls) == 4 + 1 + 1 + 1  # eager, one more warm-up, capture
    with pytest.raises(ValueError, match="capture_after"):
        GraphCache(fn, capture_after=-1)


def test_prepare_captures_only_what_the_next_call_would():
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x - 1

    g = GraphCache(fn, capture_after=1)
    x = torch.randn(6, device="cuda") + 0.5
    assert not g.prepare(x) and g.captures == 0 and not calls  # the first call runs eagerly: nothing to do
    assert torch.equal(g(x), x - 1) and len(calls) == 1
    assert g.prepare(torch.zeros(6, device="cuda")) and g.captures == 1 and len(calls) == 2  # captured
    assert not g.prepare(x) and g.captures == 1  # already captured
    assert torch.equal(g(x), x - 1) and len(calls) == 2  # the real values replay the prepared graph
    assert not g.prepare(torch.zeros(2, 3, device="cuda"))  # an unseen signature: its first call is eager
    with pytest.raises(ValueError, match="CUDA tensors"):
        g.prepare(torch.zeros(6))


def test_decode_graph_is_captured_before_the_loop(monkeypatch):
    """The second image captures text, then the VAE decode, then the loop (one shared pool: the loop's
    blocks come out of the decode's freed segments); the replays equal the eager images."""
    import speedsd
    from speedsd import ops

    order = []
    capture = GraphCache._capture

    def spy(self, args, warmup):
        order.append(self.fn.__name__)
        assert warmup == 0  # the first image's eager calls warmed each signature up
        return capture(self, args, warmup)

    monkeypatch.setattr(GraphCache, "_capture", spy)
    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=ops.PRESETS["fast"])
    eager = pipe.with_flags(ops.PRESETS["fast"].replace(cuda_graphs=False))
    kw = dict(steps=3, height=64, width=64, seed=11, output="tensor")
    images = [pipe("a cat", **kw) for _ in range(3)]  # eager, captures, replays
    assert order == ["_text_forward", "_vae_decode", "loop"]
    assert torch.equal(images[1], images[2])
    torch.testing.assert_close(images[1], eager("a cat", **kw), atol=2e-3, rtol=0)
    pipe("a cat", **{**kw, "height": 96, "output": "latent"})  # latents only: no decode, nothing prepared
    pipe("a cat", **{**kw, "height": 96, "output": "latent"})
    assert order == ["_text_forward", "_vae_decode", "loop", "loop"]


def test_graph_output_is_not_aliased():
    g = GraphCache(lambda x: x * 2)
    a = g(torch.ones(4, device="cuda"))
    g(torch.full((4,), 3.0, device="cuda"))
    assert a.eq(2).all()


def test_engine_graphs_match_eager_and_fidelity():
    """Tiny model, fp16: graphs on == graphs off (same kernels), several sizes."""
    import speedsd
    from speedsd import ops

    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=ops.PRESETS["fast"])
    eager = pipe.with_flags(ops.PRESETS["fast"].replace(cuda_graphs=False))
    for size in (64, 96, 64, 64):  # 64: the first image runs eagerly, the second captures, the third replays
        kw = dict(steps=3, height=size, width=size, seed=7, output="tensor")
        torch.testing.assert_close(pipe("a cat", **kw), eager("a cat", **kw), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_fidelity_sd14_geometry():
    """Optimized fp16 image vs diffusers fp32 <= 2x diffusers fp16 vs fp32 (max abs), SD-1.4 geometry."""
    pytest.importorskip("diffusers")
    import speedsd
    from speedsd.bench.peers import fidelity

    pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
    res = fidelity(pipe, steps=20, size=512)
    assert res["ratio_max_abs"] <= 2.0, res


_FAILED_CAPTURE = """
import torch, warnings
from speedsd.graphs import GraphCache
g = GraphCache(lambda x: x * float(x.sum().item()), eager_fallback=False)  # .item(): no capture
try:
    g(torch.ones(4, device="cuda"))
    raise SystemExit("no error")
except RuntimeError:
    pass
fallback = GraphCache(lambda x: x * float(x.sum().item()))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert fallback(torch.ones(4, device="cuda")).eq(4).all()
assert any("running eagerly" in str(x.message) for x in w)
ok = GraphCache(lambda x: x + 1)  # a failed capture must not break the next one
assert ok(torch.ones(4, device="cuda")).eq(2).all() and ok.captures == 1
print("OK")
"""


def test_failed_capture_raises_without_eager_fallback():
    """In a subprocess: torch leaves its CUDA RNG in capture mode after a failed capture (a torch
    bug our GraphCache cannot undo), which would break later tests that draw CUDA random numbers."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _FAILED_CAPTURE], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "dpmpp_2m_karras", "euler_a"])
def test_whole_loop_graph_matches_step_by_step(scheduler):
    """The whole denoising loop replayed from one graph == the step-by-step path (a callback forces
    it); samplers that draw noise are never captured."""
    import speedsd
    from speedsd import ops

    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=ops.PRESETS["fast"])
    kw = dict(steps=5, height=64, width=64, seed=3, output="latent", scheduler=scheduler, guidance_scale=6.0)
    first = pipe("a cat", **kw)  # captured
    again = pipe("a cat", **kw)  # replayed
    steps = []
    by_step = pipe("a cat", callback=lambda i, n, t, x: steps.append(i), **kw)
    assert steps == list(range(6 if scheduler == "pndm" else 5))  # PNDM evaluates steps + 1 times
    assert len([c for c in pipe._loop_graphs.values() if c is not None]) == (0 if scheduler == "euler_a" else 1)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(first, by_step, atol=1e-4, rtol=1e-4)
    # the same loop graph with another text: the replay projects the new text's cross-attention K/V
    dog = pipe("a dog", **kw)
    assert len([c for c in pipe._loop_graphs.values() if c is not None]) == (0 if scheduler == "euler_a" else 1)
    torch.testing.assert_close(dog, pipe("a dog", callback=lambda *a: None, **kw), atol=1e-4, rtol=1e-4)
    assert not torch.equal(dog, first)
    other = pipe("a cat", **{**kw, "guidance_scale": 3.0})  # another guidance: another loop graph
    assert not torch.equal(other, first)


def test_img2img_whole_loop_graph_matches_step_by_step():
    """img2img starts mid-schedule (the sampler's begin index): the loop graph keys on it."""
    import speedsd
    from speedsd import ops

    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=ops.PRESETS["fast"])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for scheduler in ("ddim", "dpmpp_2m"):
        kw = dict(steps=6, seed=5, output="latent", scheduler=scheduler)
        graphed = [pipe.img2img("a cat", image, strength=s, **kw) for s in (0.5, 0.8, 0.5)]
        by_step = [pipe.img2img("a cat", image, strength=s, callback=lambda *a: None, **kw) for s in (0.5, 0.8)]
        torch.testing.assert_close(graphed[0], by_step[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(graphed[1], by_step[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(graphed[2], graphed[0], atol=0, rtol=0)


def test_long_prompt_graphs_match_eager():
    """A prompt read in three 75-token blocks (context 231 tokens): the text-encoder graph takes the
    [B·3, 77] batch, the whole-loop graph is captured for the longer context next to the short one's,
    and both match the eager engine; the per-step graphs (a callback) too."""
    import speedsd
    from speedsd import ops

    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=ops.PRESETS["fast"])
    eager = pipe.with_flags(ops.PRESETS["fast"].replace(cuda_graphs=False))
    long = "a cat on a red sofa in a sunny room " * 20
    assert pipe.tokenizer.chunks(long) == 3
    kw = dict(steps=4, height=64, width=64, seed=3, output="latent", scheduler="dpmpp_2m", guidance_scale=6.0)
    short = pipe("a cat", **kw)
    first = pipe(long, **kw)  # eager loop (a new input shape), then captured, then replayed
    graphed = [pipe(long, **kw) for _ in range(2)]
    assert len([c for c in pipe._loop_graphs.values() if c is not None]) == 1  # one key, two signatures
    by_step = pipe(long, callback=lambda *a: None, **kw)
    ref = eager(long, **kw)
    torch.testing.assert_close(graphed[0], graphed[1], atol=0, rtol=0)
    for out in (first, graphed[0], by_step):
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(pipe("a cat", **kw), short, atol=0, rtol=0)  # the short prompt's graph is kept
    assert not torch.equal(pipe(long, truncate_prompt=True, **kw), graphed[0])
