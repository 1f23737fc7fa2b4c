"""A minimal ctypes binding of cuBLASLt for the probe: Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N]) (+ beta * C),
row-major fp16/bf16, fp32 accumulation, with a chosen heuristic algorithm.

Row-major Y = X W^T is column-major Y^T = W X^T: A = W (stored [N, K] row-major = K x N column-major, op T),
B = X (K x M column-major, op N), D = Y^T (N x M column-major). The bias runs along D's rows (N).
"""

from __future__ import annotations

import ctypes

import torch

CUDA_R_16F, CUDA_R_32F, CUDA_R_16BF = 2, 0, 14
COMPUTE_32F = 68
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
PREF_MAX_WORKSPACE = 1
OP_N, OP_T = 0, 1
# cublasLtMatmulAlgoConfigAttributes_t
CFG_ID, CFG_TILE, CFG_SPLITK, CFG_RED, CFG_SWIZZLE, CFG_CUSTOM, CFG_STAGES, CFG_INNER, CFG_CLUSTER = range(9)
WORKSPACE = 32 * 2**20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]  # fmt: skip


def _lib() -> ctypes.CDLL:
    torch.ones(8, 8, device="cuda", dtype=torch.float16) @ torch.ones(8, 8, device="cuda", dtype=torch.float16)
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcublasLt" in line}
    if not paths:
        raise RuntimeError("libcublasLt is not loaded by torch")
    return ctypes.CDLL(sorted(paths)[0])


_L: ctypes.CDLL | None = None
_H = ctypes.c_void_p()
_WS: torch.Tensor | None = None


def lib() -> ctypes.CDLL:
    global _L, _WS
    if _L is None:
        _L = _lib()
        _argtypes(_L)
        _check(_L.cublasLtCreate(ctypes.byref(_H)), "create")
        _WS = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    return _L


def _argtypes(L: ctypes.CDLL) -> None:
    P, I, U64, I64, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    sig = {
        "cublasLtCreate": [P],
        "cublasLtMatmulDescCreate": [P, I, I],
        "cublasLtMatmulDescSetAttribute": [P, I, P, SZ],
        "cublasLtMatrixLayoutCreate": [P, I, U64, U64, I64],
        "cublasLtMatmulPreferenceCreate": [P],
        "cublasLtMatmulPreferenceSetAttribute": [P, I, P, SZ],
        "cublasLtMatmulPreferenceDestroy": [P],
        "cublasLtMatmulAlgoGetHeuristic": [P, P, P, P, P, P, P, I, P, P],
        "cublasLtMatmul": [P, P, P, P, P, P, P, P, P, P, P, P, P, P, SZ, P],
        "cublasLtMatmulAlgoConfigGetAttribute": [P, I, P, SZ, P],
    }
    for name, args in sig.items():
        fn = getattr(L, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cublasLt {what}: status {status}")


def _i32(v: int) -> ctypes.c_int32:
    return ctypes.c_int32(v)


class Gemm:
    """One problem: M, N, K, dtype, bias or not, beta (0: D only; 1: D = C + ...)."""

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype, bias: bool, beta: float) -> None:
        L = lib()
        self.m, self.n, self.k, self.bias, self.beta = m, n, k, bias, beta
        dt = {torch.float16: CUDA_R_16F, torch.bfloat16: CUDA_R_16BF}[dtype]
        self.desc = ctypes.c_void_p()
        _check(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, CUDA_R_32F), "desc")
        for attr, val in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N), (DESC_EPILOGUE, EPILOGUE_BIAS if bias else EPILOGUE_DEFAULT)):
            v = _i32(val)
            _check(L.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), f"attr {attr}")
        self.a, self.b, self.c = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), dt, ctypes.c_uint64(k), ctypes.c_uint64(n), ctypes.c_int64(k)), "A")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), dt, ctypes.c_uint64(k), ctypes.c_uint64(m), ctypes.c_int64(k)), "B")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.c), dt, ctypes.c_uint64(n), ctypes.c_uint64(m), ctypes.c_int64(n)), "C")
        self.alpha = ctypes.c_float(1.0)
        self.beta_c = ctypes.c_float(beta)

    def heuristics(self, count: int = 32) -> list[Heuristic]:
        L = lib()
        pref = ctypes.c_void_p()
        _check(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        ws = ctypes.c_uint64(WORKSPACE)
        _check(L.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(ws), 8), "pref ws")
        res = (Heuristic * count)()
        got = ctypes.c_int(0)
        _check(L.cublasLtMatmulAlgoGetHeuristic(_H, self.desc, self.a, self.b, self.c, self.c, pref, count, res,
                                                ctypes.byref(got)), "heuristic")  # fmt: skip
        L.cublasLtMatmulPreferenceDestroy(pref)
        return [res[i] for i in range(got.value) if res[i].state == 0]

    def run(self, algo: Algo, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
            c: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        L = lib()
        if self.bias:
            p = ctypes.c_void_p(bias.data_ptr())
            _check(L.cublasLtMatmulDescSetAttribute(self.desc, DESC_BIAS_POINTER, ctypes.byref(p), 8), "bias ptr")
        cptr = (c if c is not None else out).data_ptr()
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check(L.cublasLtMatmul(_H, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
                                ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta_c), ctypes.c_void_p(cptr),
                                self.c, ctypes.c_void_p(out.data_ptr()), self.c, ctypes.byref(algo),
                                ctypes.c_void_p(_WS.data_ptr()), ctypes.c_size_t(WORKSPACE), stream), "matmul")  # fmt: skip
        return out


def describe(algo: Algo) -> dict[str, int]:
    L = lib()
    out = {}
    for name, attr, size in (("id", CFG_ID, 4), ("tile", CFG_TILE, 4), ("splitk", CFG_SPLITK, 4),
                             ("red", CFG_RED, 4), ("swizzle", CFG_SWIZZLE, 4), ("custom", CFG_CUSTOM, 4),
                             ("stages", CFG_STAGES, 4), ("inner", CFG_INNER, 2), ("cluster", CFG_CLUSTER, 2)):  # fmt: skip
        buf = ctypes.c_uint32(0)
        written = ctypes.c_size_t(0)
        st = L.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(buf), size, ctypes.byref(written))
        out[name] = int(buf.value) if st == 0 else -1
    return out
