"""Facts about the device a kernel launches on, shared by the launchers' heuristics."""

from __future__ import annotations

import functools

import torch


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=8)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_sm90(device: torch.device) -> bool:
    """Whether ``device`` is a Hopper GPU (compute capability 9.0: H100/H200), where the Gluon kernels'
    TMA and wgmma (sm_90a) run."""
    return device.type == "cuda" and _cuda_capability(_index(device)) == (9, 0)


@functools.lru_cache(maxsize=8)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 under the CPU interpreter: keeps grids small)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(_index(device))


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 arrival counters (at least ``n``) for kernels whose last-arriving program finishes a
    reduction: zero between calls (that program re-arms its counter), shared by every such kernel on the
    device (one stream runs them one at a time). Outgrown buffers stay allocated: captured CUDA graphs
    keep their addresses."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return bufs[-1]


def compile_ahead(src: object, capability: int = 90, **options: object) -> object:
    """``triton.compile`` of a kernel source (ASTSource / GluonASTSource) for sm_<capability> on any machine,
    no GPU needed (the tests' ptxas and SASS checks): Triton's CompiledKernel. Needs a process started without
    TRITON_INTERPRET=1 (under the interpreter Triton's own @jit helpers are interpreter functions)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if triton.knobs.runtime.interpret:
        raise RuntimeError("compiling ahead of time needs a process started without TRITON_INTERPRET=1")
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
