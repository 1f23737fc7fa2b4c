"""CUDA graphs without torch.compile: capture a function once per input signature, then replay.

A UNet step at 512² is ~1,000 kernel launches; eager PyTorch spends more time launching them than the
GPU spends running them. ``GraphCache(fn)`` records ``fn`` into a CUDA graph the first time it sees a
given (shape, dtype, device) signature of its tensor arguments (or, with ``capture_after=k``, after k
eager calls of it) and replays it afterwards: a new resolution costs one capture (milliseconds plus
the Triton JIT of any new kernel specialization), not a minutes-long compile.

Rules for ``fn``: tensors in, one tensor out; no host synchronisation inside (no ``.item()``, no
data-dependent Python branches); the same Python-side behaviour on every call for a signature.
Weights are read in place by the replay, so in-place weight updates (LoRA merges) are seen; anything
``fn`` derives from weights and caches (fused QKV weights, Winograd-transformed filters) is captured
as it was, so call :meth:`GraphCache.reset` after changing weights.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device, bool], ...]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


def _signature(args: tuple[torch.Tensor, ...]) -> Signature:
    return tuple(
        (tuple(a.shape), a.dtype, a.device, a.is_contiguous(memory_format=torch.channels_last) and a.dim() == 4)
        for a in args
    )


def _end_pool_allocation(device: torch.device, graph: torch.cuda.CUDAGraph) -> None:
    """After a failed capture: stop routing allocations to the graph's pool.

    torch's ``capture_end`` raises on an invalidated capture before it tells the caching allocator
    that the capture is over, which would leave the allocator recording into that pool and fail every
    later capture with "already recording to mempool_id". (It also skips resetting the CUDA RNG's
    capture state, which we cannot reach: after a failed capture, CUDA random numbers fail. The engine
    draws its noise on the CPU, and only captures code known to be capturable.)
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is None:
        return
    try:
        end(device.index if device.index is not None else torch.cuda.current_device(), graph.pool())
    except RuntimeError:  # capture_end got that far after all: nothing is left recording
        pass


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up: cuBLAS/cuDNN keep a workspace per stream, so a
    fresh stream per capture would leave one more workspace behind each time."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class GraphCache:
    """Replays ``fn(*args)`` from a CUDA graph per input signature (LRU, ``max_entries`` graphs)."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        max_entries: int = 8,
        warmup: int = 1,
        pool: tuple[int, int] | None = None,
        eager_fallback: bool = True,
        capture_after: int = 0,
    ) -> None:
        """``pool``: a ``torch.cuda.graph_pool_handle()`` shared with other caches whose graphs never run
        concurrently with these (the UNet step and the VAE decode), so their activations share memory.
        ``eager_fallback=False``: a failed capture raises instead of running ``fn`` eagerly (for callers
        with a better fallback of their own). ``capture_after``: run a new signature eagerly on its
        first ``capture_after`` calls and capture on the next one. For a function called once per image
        (the whole denoising loop, the VAE decode) 1 makes the first image cost one eager run instead
        of a warm-up run, a capture and a replay: a process that makes one image never records graphs
        it would not replay, and the second image pays for the capture instead."""
        if capture_after < 0:
            raise ValueError(f"capture_after must be >= 0, got {capture_after}")
        self.fn = fn
        self.max_entries = max_entries
        self.warmup = warmup
        self.capture_after = capture_after
        self._calls: OrderedDict[Signature, int] = OrderedDict()  # eager calls so far, per uncaptured signature
        self._entries: OrderedDict[Signature, _Entry] = OrderedDict()
        self._shared_pool = pool
        self._pool = pool
        self._eager: set[Signature] = set()
        self.eager_fallback = eager_fallback
        self.captures = 0

    def reset(self) -> None:
        """Drop every captured graph (after weights or flags change)."""
        self._entries.clear()
        self._eager.clear()
        self._calls.clear()
        self._pool = self._shared_pool

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            raise ValueError("GraphCache takes CUDA tensors only")
        key = _signature(args)
        if key in self._eager:
            return self.fn(*args)
        entry = self._entries.get(key)
        seen = self._calls.get(key, 0)
        if entry is None and seen < self.capture_after:
            self._calls[key] = seen + 1
            self._calls.move_to_end(key)
            if len(self._calls) > 4 * self.max_entries:
                self._calls.popitem(last=False)
            return self._on_warmup_stream(args)
        if entry is None:
            entry = self._capture_entry(key, args)
            if entry is None:  # the capture failed: this signature runs eagerly from now on
                return self.fn(*args)
        else:
            self._entries.move_to_end(key)
        for dst, src in zip(entry.inputs, args):
            dst.copy_(src)
        entry.graph.replay()
        # The output buffer is overwritten by the next replay: callers that keep it (PNDM's history)
        # must not alias it, so hand out a copy (tiny next to the step itself).
        return entry.output.clone()

    def prepare(self, *args: torch.Tensor) -> bool:
        """Capture ``args``' signature now if its next call would capture it; True if it did.

        Only the signature of ``args`` matters (their values feed any warm-up run): the pipeline
        captures the VAE decode before the denoising loop this way, so the loop's capture, sharing
        the pool, carves its blocks out of the decode's large freed segments instead of the decode
        needing segments of its own (see ``speedsd.decode.prepare``)."""
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            raise ValueError("GraphCache takes CUDA tensors only")
        key = _signature(args)
        if key in self._eager or key in self._entries or self._calls.get(key, 0) < self.capture_after:
            return False
        return self._capture_entry(key, args) is not None

    def _capture_entry(self, key: Signature, args: tuple[torch.Tensor, ...]) -> _Entry | None:
        """Capture and cache ``key``; None (the signature marked eager) where capture failed and
        ``eager_fallback`` allows it."""
        eager_runs = self._calls.pop(key, 0)
        try:
            entry = self._capture(args, warmup=max(0, self.warmup - eager_runs))
        except RuntimeError as e:  # a library call refused capture: run this signature eagerly
            if not self.eager_fallback:
                torch.cuda.synchronize()
                raise
            msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            warnings.warn(f"CUDA graph capture failed ({msg}); running eagerly", stacklevel=3)
            torch.cuda.synchronize()
            self._eager.add(key)
            return None
        self._entries[key] = entry
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def _on_warmup_stream(self, args: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """``fn(*args)`` eagerly on the stream the warm-ups and captures use (a signature's eager calls
        and the warm-up before its capture): cuBLAS keeps a workspace per stream (32 MiB on Hopper), so
        an eager run on the current stream would add one for good."""
        current = torch.cuda.current_stream(args[0].device)
        stream = _warmup_stream(args[0].device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = self.fn(*args)
        current.wait_stream(stream)
        out.record_stream(current)  # made on the side stream, used and freed on the current one
        return out

    def _capture(self, args: tuple[torch.Tensor, ...], warmup: int) -> _Entry:
        """``warmup`` eager runs first (Triton JIT, cuDNN/cuBLAS plans, lazy caches): none where this
        signature's ``capture_after`` eager calls, on the same stream, already did that. (A warm-up
        there would only cost time and, with a graph of the shared pool already held, raise the
        reserved peak by the warm-up's activations: ~100 MiB for a 512² loop.)"""
        static = [a.detach().clone(memory_format=torch.preserve_format) for a in args]
        for _ in range(warmup):
            self._on_warmup_stream(static)
        stream = _warmup_stream(args[0].device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # captured on the warm-up stream: cuBLAS keeps a workspace per stream, one fewer set held
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out = self.fn(*static)
        except RuntimeError:
            _end_pool_allocation(args[0].device, graph)
            raise
        self.captures += 1
        # The eager warm-up's activations sit in the allocator's cache (the VAE decode's: hundreds of
        # MiB); the replays never use them, so give them back to the device. (Warming up inside the
        # graph pool instead would share those blocks with the capture, but is unsafe: whatever the
        # warm-up allocates to keep -- lazily built caches, the cuBLAS workspace -- could then sit in
        # blocks that other graphs of the pool overwrite as scratch on replay. Tried; it corrupted
        # the replays.)
        torch.cuda.empty_cache()
        return _Entry(graph, static, out)
