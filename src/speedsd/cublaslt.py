"""cuBLASLt through ctypes: a linear layer run with the algorithm a per-card table measured fastest.

torch runs a linear with cuBLAS(Lt)'s first heuristic choice. For the UNet's short GEMMs that choice is not
always the fastest of the algorithms the same heuristic offers (bench/results/cublaslt_probe_h200.json: the 25
64² 8192x320->320 linears a step take 6.7 µs as torch calls them and 5.4 µs with the heuristic's second
choice, a 1.9-wave tile). :mod:`speedsd.gemm_table` keeps, per card and problem, the measured algorithm's
configuration; :func:`plan` finds it again among the heuristic's answers for the problem (a library that no
longer offers it gives None: the caller runs torch).

    Y[M, N] = X[M, K] @ W[N, K]ᵀ (+ bias[N])        or, accumulate:  R[M, N] += X @ Wᵀ (beta = 1, in place)

row-major, fp16/bf16, fp32 accumulation. Row-major Y = X Wᵀ is column-major Yᵀ = W Xᵀ: A = W (K x N column-major,
leading dimension = W's row stride, op T), B = X (K x M, ld = X's row stride, op N), C = D = Yᵀ (N x M, ld N).
The library is the one torch loaded (found in /proc/self/maps), so there is one cuBLASLt in the process.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

_CUDA_DTYPE = {torch.float16: 2, torch.bfloat16: 14}
_COMPUTE_32F, _R_32F = 68, 0
_TRANSA, _TRANSB, _EPILOGUE, _BIAS_POINTER = 3, 4, 7, 8
_EPI_DEFAULT, _EPI_BIAS = 1, 4
_PREF_WORKSPACE, _PREF_ALIGN_A, _PREF_ALIGN_B, _PREF_ALIGN_C, _PREF_ALIGN_D = 1, 5, 6, 7, 8
# cublasLtMatmulAlgoConfigAttributes_t: the fields that name an algorithm (and their sizes in bytes)
CONFIG_FIELDS = (("id", 0, 4), ("tile", 1, 4), ("splitk", 2, 4), ("reduction", 3, 4), ("swizzle", 4, 4),
                 ("custom", 5, 4), ("stages", 6, 4), ("inner", 7, 2), ("cluster", 8, 2))  # fmt: skip
WORKSPACE_BYTES = 2**20  # the chosen algorithms use none or a few bytes (cublaslt_probe_h200.json)


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One GEMM shape: M rows of x (row stride ldx), K -> N features, W's row stride ldw, bias or accumulate."""

    m: int
    k: int
    n: int
    ldx: int
    ldw: int
    dtype: torch.dtype
    bias: bool = False
    accumulate: bool = False
    align: int = 256  # bytes every pointer is aligned to (a power of 2, 16 .. 256)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """torch's cuBLASLt with the signatures this module calls, or None (no CUDA, no library loaded)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.current_blas_handle()  # makes torch load its cuBLAS (and cuBLASLt)
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcublasLt" in line})
        lib = ctypes.CDLL(paths[0])
    except (OSError, IndexError):
        return None
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "cublasLtCreate": [p], "cublasLtMatmulDescCreate": [p, i, i], "cublasLtMatmulDescSetAttribute": [p, i, p, sz],
        "cublasLtMatrixLayoutCreate": [p, i, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
        "cublasLtMatmulPreferenceCreate": [p], "cublasLtMatmulPreferenceSetAttribute": [p, i, p, sz],
        "cublasLtMatmulPreferenceDestroy": [p], "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, sz, p],
        "cublasLtMatmulAlgoConfigGetAttribute": [p, i, p, sz, p],
    }  # fmt: skip
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@functools.lru_cache(maxsize=4)
def _handle(device: int) -> tuple[ctypes.c_void_p, torch.Tensor]:
    """(cuBLASLt handle, workspace) for a device: one each, made on first use, kept for the process."""
    lib = _lib()
    assert lib is not None
    h = ctypes.c_void_p()
    _check(lib.cublasLtCreate(ctypes.byref(h)), "create")
    return h, torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", device))


def _set(lib: ctypes.CDLL, fn: str, obj: ctypes.c_void_p, attr: int, value: ctypes._SimpleCData) -> None:
    _check(getattr(lib, fn)(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


class Plan:
    """Descriptors of one :class:`Problem` and the algorithm to run it with."""

    def __init__(self, problem: Problem, device: int) -> None:
        lib = _lib()
        if lib is None:
            raise RuntimeError("cuBLASLt is not available (no CUDA, or torch loaded no libcublasLt)")
        self.lib, self.problem, self.device = lib, problem, device
        pr, dt = problem, _CUDA_DTYPE[problem.dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "descriptor")
        _set(lib, "cublasLtMatmulDescSetAttribute", self.desc, _TRANSA, ctypes.c_int32(1))  # W: op T
        _set(lib, "cublasLtMatmulDescSetAttribute", self.desc, _TRANSB, ctypes.c_int32(0))
        epi = ctypes.c_uint32(_EPI_BIAS if pr.bias else _EPI_DEFAULT)
        _set(lib, "cublasLtMatmulDescSetAttribute", self.desc, _EPILOGUE, epi)
        self.a, self.b, self.c = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        layouts = ((self.a, pr.k, pr.n, pr.ldw), (self.b, pr.k, pr.m, pr.ldx), (self.c, pr.n, pr.m, pr.n))
        for lay, rows, cols, ld in layouts:
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dt, rows, cols, ld), "layout")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if pr.accumulate else 0.0)
        self.algo: _Algo | None = None

    def heuristics(self, count: int = 16) -> list[tuple[_Algo, dict[str, int], float]]:
        """The heuristic's working algorithms for this problem, best-ranked first: (algo, config, waves)."""
        lib, pref = self.lib, ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        try:
            _set(lib, "cublasLtMatmulPreferenceSetAttribute", pref, _PREF_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES))
            for attr in (_PREF_ALIGN_A, _PREF_ALIGN_B, _PREF_ALIGN_C, _PREF_ALIGN_D):
                _set(lib, "cublasLtMatmulPreferenceSetAttribute", pref, attr, ctypes.c_uint32(self.problem.align))
            res, got = (_Heuristic * count)(), ctypes.c_int(0)
            handle = _handle(self.device)[0]
            _check(lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.c, self.c, pref, count,
                                                      res, ctypes.byref(got)), "heuristic")  # fmt: skip
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        ok = [res[i] for i in range(got.value) if res[i].state == 0]
        return [(h.algo, config_of(h.algo), float(h.waves)) for h in ok]

    def run(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """out = x @ wᵀ (+ bias), or out += x @ wᵀ (accumulate), on the current stream. The caller checked the
        shapes, strides, dtypes, device and alignment (:func:`problem_of`)."""
        assert self.algo is not None, "no algorithm chosen"
        lib = self.lib
        if self.problem.bias:
            _set(lib, "cublasLtMatmulDescSetAttribute", self.desc, _BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        handle, ws = _handle(self.device)
        d = ctypes.c_void_p(out.data_ptr())
        stream = ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream)
        _check(lib.cublasLtMatmul(handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
                                  ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), d, self.c, d, self.c,
                                  ctypes.byref(self.algo), ctypes.c_void_p(ws.data_ptr()), WORKSPACE_BYTES,
                                  stream), "matmul")  # fmt: skip
        return out


def config_of(algo: _Algo) -> dict[str, int]:
    """The fields that name an algorithm (:data:`CONFIG_FIELDS`)."""
    lib = _lib()
    assert lib is not None
    out = {}
    for name, attr, size in CONFIG_FIELDS:
        buf, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
        _check(lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(buf), size,
                                                        ctypes.byref(written)), f"config {name}")  # fmt: skip
        out[name] = int(buf.value)
    return out


def problem_of(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> Problem | None:
    """The :class:`Problem` of x [..., K] @ w[N, K]ᵀ (+ bias) (accumulating into ``out`` [..., N] when given), or
    None where this module cannot run it: not CUDA, not fp16/bf16, x's rows or w's rows not unit-stride with a
    row stride, bias not a contiguous [N] of the same dtype, ``out`` not contiguous, pointers not 16-byte aligned."""
    if x.device.type != "cuda" or w.device != x.device:
        return None
    return layout_problem(x, w, bias, out)


def layout_problem(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> Problem | None:
    """:func:`problem_of` without the device check (any device: the layout, dtype and alignment rules)."""
    if x.dtype not in _CUDA_DTYPE or w.dtype != x.dtype:
        return None
    if w.dim() != 2 or x.dim() < 2 or x.shape[-1] != w.shape[1] or w.stride(1) != 1 or w.stride(0) < w.shape[1]:
        return None
    k, n = w.shape[1], w.shape[0]
    m = x.numel() // k if k else 0
    if min(m, n, k) == 0 or x.stride(-1) != 1 or any(
        x.stride(i) != x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2)
    ):  # x must flatten to [M, K] rows of one stride
        return None
    if x.stride(-2) < k or (bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.stride(0) != 1)):
        return None
    if out is not None and (out.shape != (*x.shape[:-1], n) or not out.is_contiguous() or out.dtype != x.dtype):
        return None
    ptrs = [x.data_ptr(), w.data_ptr()] + [t.data_ptr() for t in (bias, out) if t is not None]
    align = 256
    while align > 16 and any(p % align for p in ptrs):
        align //= 2
    if any(p % align for p in ptrs) or x.stride(-2) % 8 or w.stride(0) % 8:
        return None
    return Problem(m, k, n, x.stride(-2), w.stride(0), x.dtype, bias is not None, out is not None, align)


_PLANS: dict[tuple[Problem, int, tuple], Plan | None] = {}


def plan(problem: Problem, device: int, config: dict[str, int]) -> Plan | None:
    """A plan running ``problem`` with the algorithm of this ``config`` (as :func:`config_of` names it), or None
    where the heuristic does not offer it (another library version, another alignment). Cached per process."""
    key = (problem, device, tuple(sorted(config.items())))
    if key not in _PLANS:
        p = Plan(problem, device)
        match = [a for a, c, _ in p.heuristics() if all(c.get(f) == v for f, v in config.items())]
        p.algo = match[0] if match else None
        _PLANS[key] = p if match else None
    return _PLANS[key]
