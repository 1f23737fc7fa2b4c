"""Independent branches of a forward on a second CUDA stream (``flags.side_stream``).

Most of a 512² UNet step is a chain: every kernel reads what the previous one wrote. The up path's
ResNet shortcut is not: its two 1x1 GEMMs over cat([x, skip]) (models/skip_concat.py) are read only
by conv2's epilogue, three kernels later, while norm1 and conv1 leave SMs idle on the 32², 16² and 8²
levels (cuDNN fills 80 CTAs of 132 there). :func:`fork` runs such a branch on a side stream, and
:meth:`Branch.join` makes the current stream wait for it just before its result is read. Inside a
CUDA-graph capture this becomes a fork/join in the graph, so a replay runs the branch concurrently.

Memory rules, so the caching allocator never hands a block to one stream while the other still reads
it: the branch's inputs stay referenced by the :class:`Branch` until :meth:`~Branch.join` (the
current stream frees them only after it waited for the branch); the branch's output is allocated on
the side stream and freed on the current stream after the join; the side stream's next allocation
comes after its next fork, which waits for everything the current stream enqueued before it.
Off CUDA, or with the flag off, the branch runs in place on the current stream: same values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device (cuBLAS keeps a workspace per stream: one more set, not one per fork)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class Branch:
    """The result of :func:`fork`: :meth:`join` it once, on the stream that forked it."""

    __slots__ = ("_value", "_event", "_keep")

    def __init__(self, value: torch.Tensor, event: torch.cuda.Event | None, keep: tuple[object, ...] = ()) -> None:
        self._value: torch.Tensor | None = value
        self._event = event
        self._keep = keep  # the branch's inputs, alive until the join (see the module doc)

    @property
    def concurrent(self) -> bool:
        """Whether the branch was enqueued on the side stream."""
        return self._event is not None

    def join(self) -> torch.Tensor:
        """The branch's output, safe to read on the current stream from here on."""
        if self._value is None:
            raise RuntimeError("this Branch was already joined")
        value, self._value = self._value, None
        if self._event is not None:
            torch.cuda.current_stream(value.device).wait_event(self._event)
        self._event, self._keep = None, ()
        return value


def fork(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: object, enabled: bool = True) -> Branch:
    """``fn(x, *args)`` on the side stream of ``x``'s device, after everything enqueued so far on the
    current stream; in place (no stream) when ``enabled`` is False or ``x`` is not on CUDA."""
    device = x.device
    if not enabled or device.type != "cuda":
        return Branch(fn(x, *args), None)
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        value = fn(x, *args)
        done = torch.cuda.Event()
        done.record(side)
    return Branch(value, done, keep=(x, *args))
