"""The side stream (speedsd.streams, flags.side_stream): same values as one stream, in eager runs and in
CUDA-graph replays; in place off CUDA."""

from __future__ import annotations

import pytest
import torch
from streams import Branch, fork  # (this folder; was speedsd.streams)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _branch_fn(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    return (x @ w) * scale


def test_fork_in_place_off_cuda_or_disabled():
    x, w = torch.randn(5, 7) + 0.5, torch.randn(7, 3)
    for enabled in (True, False):
        b = fork(_branch_fn, x, w, 2.0, enabled=enabled)
        assert isinstance(b, Branch) and not b.concurrent
        torch.testing.assert_close(b.join(), (x @ w) * 2.0)
        with pytest.raises(RuntimeError, match="already joined"):
            b.join()


@cuda
@pytest.mark.gpu
def test_fork_runs_on_the_side_stream_and_joins():
    x = torch.randn(2048, 1024, device="cuda") + 0.25
    w = torch.randn(1024, 1024, device="cuda")
    want = (x @ w) * 0.5
    main = torch.cuda.current_stream()
    b = fork(_branch_fn, x, w, 0.5)
    assert b.concurrent
    y = torch.relu(x)  # current-stream work enqueued while the branch may still run
    got = b.join()
    assert torch.cuda.current_stream() == main
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(y, torch.relu(x))


@cuda
@pytest.mark.gpu
def test_fork_inside_a_cuda_graph():
    """A fork/join inside a capture: the replay runs the branch and waits for it, for new inputs too."""
    from speedsd.graphs import GraphCache

    w = torch.randn(256, 256, device="cuda")

    def fn(x: torch.Tensor) -> torch.Tensor:
        b = fork(_branch_fn, x, w, 3.0)
        h = torch.tanh(x) @ w  # the main stream's own chain meanwhile
        return h + b.join()

    g = GraphCache(fn)
    for _ in range(3):
        x = torch.randn(512, 256, device="cuda") + 0.5
        torch.testing.assert_close(g(x), torch.tanh(x) @ w + (x @ w) * 3.0)
    assert g.captures == 1


@cuda
@pytest.mark.gpu
def test_engine_side_stream_matches_one_stream():
    """Tiny model, fp16: the up path's shortcut GEMMs on the side stream give the one-stream images bit
    for bit (the same kernels), eager and replayed from graphs."""
    import speedsd
    from speedsd import ops

    fast = ops.PRESETS["fast"]
    assert fast.side_stream
    pipe = speedsd.load("random:tiny", device="cuda", dtype=torch.float16, flags=fast)
    kw = dict(steps=3, height=64, width=64, seed=5, output="tensor")
    for graphs in (False, True):
        two = pipe.with_flags(fast.replace(cuda_graphs=graphs))
        one = pipe.with_flags(fast.replace(cuda_graphs=graphs, side_stream=False))
        images = [two("a cat", **kw) for _ in range(3)]  # graphs: eager, capture, replay
        want = one("a cat", **kw)
        for img in images:
            assert torch.equal(img, want), graphs
