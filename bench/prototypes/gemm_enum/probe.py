"""Probe: does a wider cuBLASLt search beat the GEMM table's heuristic-only choices (session 29)?

    python probe.py ROW.json INDEX        (one problem, 0 = the heaviest; one process each)
    python probe.py merge OUT.json ROW.json...

For the UNet's heaviest linear problems (bench/results/gemm_algos_h200.json, by calls x torch µs), time in CUDA-graph
replay with weights cycled out of L2:
  torch      the call as torch makes it
  table      the GEMM table's entry (speedsd.cublaslt.plan), where there is one
  heur/smN   every algorithm the heuristic offers with CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET = N (N = 0: unset)
  enum       algorithms built by hand: every id of cublasLtMatmulAlgoGetIds, AlgoInit, then tile x stages x custom
             option x cluster x swizzle (x split-K for short problems), kept where cublasLtMatmulAlgoCheck accepts
Each candidate is checked against fp64 (max abs error <= 2x torch's + 1e-3, NaN-poisoned output). A screening pass
(3 replays) ranks the candidates; the best 6 of each source are re-timed with 9 replays next to torch.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import random
import re
import sys
import time

import torch

from speedsd import cublaslt, gemm_table
from speedsd.bench import common
from speedsd.bench.gemm_algos import operands

SM_TARGETS = (0, 66, 100, 114, 120, 126, 128, 130)
_SM_COUNT_TARGET = 15  # cublasLtMatmulDescAttributes_t
_CAP_SPLITK, _CAP_RED_MASK, _CAP_SWIZZLE, _CAP_TILES, _CAP_CUSTOM_MAX, _CAP_STAGES = 0, 1, 2, 6, 7, 13
CLUSTERS = (0, 2, 3, 4, 5, 6, 8)  # auto, 1x1, 2x1, 4x1, 1x2, 2x2, 1x4 (cublasLtClusterShape_t)
MAX_ENUM = 400  # candidates timed per problem (a random sample past this)


def _extra(lib: ctypes.CDLL) -> None:
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, args in {
        "cublasLtMatmulAlgoGetIds": [p, i, i, i, i, i, i, i, p, p],
        "cublasLtMatmulAlgoInit": [p, i, i, i, i, i, i, i, p],
        "cublasLtMatmulAlgoCapGetAttribute": [p, i, p, sz, p],
        "cublasLtMatmulAlgoConfigSetAttribute": [p, i, p, sz],
        "cublasLtMatmulAlgoCheck": [p, p, p, p, p, p, p, p],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


def parse(key: str) -> cublaslt.Problem:
    m = re.match(r"(\d+)x(\d+)->(\d+) ldx(\d+) ldw(\d+) (\w+) a(\d+) (\w+)", key)
    assert m, key
    mm, k, n, ldx, ldw, kind, align, dt = m.groups()
    return cublaslt.Problem(int(mm), int(k), int(n), int(ldx), int(ldw), getattr(torch, dt), kind == "bias",
                            kind == "acc", int(align))  # fmt: skip


def cap_list(lib: ctypes.CDLL, algo: cublaslt._Algo, attr: int) -> list[int]:
    written = ctypes.c_size_t(0)
    if lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(written)) != 0:
        return []
    n = written.value // 4
    if n == 0:
        return []
    buf = (ctypes.c_uint32 * n)()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, buf, 4 * n, ctypes.byref(written))
    return list(buf)


def cap_int(lib: ctypes.CDLL, algo: cublaslt._Algo, attr: int) -> int:
    v, written = ctypes.c_int32(0), ctypes.c_size_t(0)
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4, ctypes.byref(written))
    return int(v.value)


def set_cfg(lib: ctypes.CDLL, algo: cublaslt._Algo, name: str, value: int) -> bool:
    size = dict((n, s) for n, _, s in cublaslt.CONFIG_FIELDS)[name]
    attr = dict((n, a) for n, a, _ in cublaslt.CONFIG_FIELDS)[name]
    buf = ctypes.c_uint16(value) if size == 2 else ctypes.c_uint32(value)
    return lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(buf), size) == 0


def enumerate_algos(plan: cublaslt.Plan, stats: dict) -> list[tuple[cublaslt._Algo, dict]]:
    lib, pr = plan.lib, plan.problem
    handle = cublaslt._handle(plan.device)[0]
    dt = cublaslt._CUDA_DTYPE[pr.dtype]
    ids, got = (ctypes.c_int * 256)(), ctypes.c_int(0)
    cublaslt._check(lib.cublasLtMatmulAlgoGetIds(handle, cublaslt._COMPUTE_32F, cublaslt._R_32F, dt, dt, dt, dt, 256,
                                                 ids, ctypes.byref(got)), "ids")  # fmt: skip
    stats["ids"] = list(ids[: got.value])
    out, seen, checked = [], set(), 0
    res = cublaslt._Heuristic()
    small = pr.m * pr.n <= 2048 * 1280
    for aid in stats["ids"]:
        base = cublaslt._Algo()
        if lib.cublasLtMatmulAlgoInit(handle, cublaslt._COMPUTE_32F, cublaslt._R_32F, dt, dt, dt, dt, aid,
                                      ctypes.byref(base)) != 0:  # fmt: skip
            continue
        tiles = cap_list(lib, base, _CAP_TILES) or [0]
        stages = cap_list(lib, base, _CAP_STAGES) or [0]
        custom = range(min(cap_int(lib, base, _CAP_CUSTOM_MAX), 15) + 1)
        swz = (0, 1) if cap_int(lib, base, _CAP_SWIZZLE) else (0,)
        splits = (1, 2, 3, 4) if small and cap_int(lib, base, _CAP_SPLITK) else (1,)
        stats.setdefault("caps", {})[aid] = {"tiles": len(tiles), "stages": len(stages), "custom": len(custom),
                                             "swizzle": len(swz)}  # fmt: skip
        combos = list(itertools.product(tiles, stages, custom, CLUSTERS, swz, splits))
        if len(combos) > 6000:  # keep the check pass bounded
            random.Random(aid).shuffle(combos)
            combos = combos[:6000]
        for tile, st, co, cl, sw, sk in combos:
            a = cublaslt._Algo()
            ctypes.memmove(ctypes.byref(a), ctypes.byref(base), ctypes.sizeof(a))
            ok = all(set_cfg(lib, a, f, v) for f, v in (("tile", tile), ("stages", st), ("custom", co),
                                                         ("cluster", cl), ("swizzle", sw), ("splitk", sk)))  # fmt: skip
            if sk > 1:
                ok = ok and set_cfg(lib, a, "reduction", 1)
            checked += 1
            if not ok or lib.cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.c,
                                                     ctypes.byref(a), ctypes.byref(res)) != 0:  # fmt: skip
                continue
            if res.workspace > cublaslt.WORKSPACE_BYTES:
                continue
            cfg = cublaslt.config_of(a)
            key = tuple(sorted(cfg.items()))
            if key in seen:
                continue
            seen.add(key)
            out.append((a, cfg))
    stats["checked"], stats["valid"] = checked, len(out)
    return out


def sm_plan(p: cublaslt.Problem, sm: int) -> cublaslt.Plan:
    plan = cublaslt.Plan(p, 0)
    if sm:
        cublaslt._set(plan.lib, "cublasLtMatmulDescSetAttribute", plan.desc, _SM_COUNT_TARGET, ctypes.c_int32(sm))
    return plan


def problem_row(p: cublaslt.Problem, calls: int) -> dict:
    dev = torch.device("cuda")
    o = operands(p)
    x, ws, bias, r0, ref, tol, torch_call = o.x, o.ws, o.bias, o.r0, o.ref, o.tol, o.torch_call
    out = torch.empty(p.m, p.n, device=dev, dtype=p.dtype)

    def correct(plan: cublaslt.Plan) -> bool:
        if r0 is None:
            out.fill_(float("nan"))
        else:
            out.copy_(r0)
        plan.run(x, ws[0], bias, out)
        return bool((out.double() - ref).abs().max().item() <= tol)

    def timed(plan: cublaslt.Plan, reps: int) -> float:
        return 1e3 * common.cycled_graph_ms(lambda w: plan.run(x, w, bias, out), ws, reps=reps)

    row = {"key": gemm_table.problem_key(p), "calls": calls}
    row["torch_us"] = 1e3 * common.cycled_graph_ms(torch_call, ws, 9)
    cands: list[tuple[str, cublaslt.Plan, dict]] = []
    for sm in SM_TARGETS:
        for algo, cfg, _ in sm_plan(p, sm).heuristics():
            pl = sm_plan(p, sm)
            pl.algo = algo
            cands.append((f"heur/sm{sm}", pl, cfg))
    stats: dict = {}
    t0 = time.time()
    enum_plan = sm_plan(p, 0)
    enum = enumerate_algos(enum_plan, stats)
    stats["enum_s"] = round(time.time() - t0, 1)
    if len(enum) > MAX_ENUM:
        random.Random(0).shuffle(enum)
        stats["sampled"] = MAX_ENUM
        enum = enum[:MAX_ENUM]
    for algo, cfg in enum:
        pl = sm_plan(p, 0)
        pl.algo = algo
        cands.append(("enum", pl, cfg))
    table_cfg = gemm_table.choose(p, dev)
    if table_cfg is not None:
        tp = cublaslt.plan(p, 0, table_cfg)
        if tp is not None:
            cands.append(("table", tp, table_cfg))
    screened, bad, t0 = [], 0, time.time()
    for src, pl, cfg in cands:
        try:
            if not correct(pl):
                bad += 1
                continue
            screened.append((timed(pl, 3), src, pl, cfg))
        except RuntimeError as e:  # a config the check let through but the launch refused
            bad += 1
            stats.setdefault("errors", []).append(str(e)[:80])
    stats["screen_s"], stats["incorrect_or_failed"] = round(time.time() - t0, 1), bad
    row["stats"] = stats
    final = []
    for src in sorted({s for _, s, _, _ in screened}):
        best = sorted([c for c in screened if c[1] == src], key=lambda c: c[0])[:6]
        for _, s, pl, cfg in best:
            final.append({"src": s, "config": cfg, "us": timed(pl, 9)})
    row["torch_us_again"] = 1e3 * common.cycled_graph_ms(torch_call, ws, 9)
    final.sort(key=lambda r: r["us"])
    row["final"] = final
    groups = {"table": lambda s: s == "table", "heur_sm0": lambda s: s == "heur/sm0",
              "heur_any_sm": lambda s: s.startswith("heur"), "enum": lambda s: s == "enum"}  # fmt: skip
    by_src = {}
    for name, match in groups.items():
        hits = [r for r in final if match(r["src"])]
        if hits:
            by_src[name] = hits[0]
    row["best_by_source"] = by_src
    brief = {k: (round(v["us"], 2), v["src"]) for k, v in by_src.items()}
    print(row["key"], calls, "torch", round(row["torch_us"], 2), brief, stats.get("valid"), flush=True)
    return row


def main(out_json: str, index: int) -> None:
    """Problem ``index`` (0 = the heaviest) into out_json; one process a problem, so a config that faults the
    context loses one row, not the run."""
    lib = cublaslt._lib()
    assert lib is not None
    _extra(lib)
    src = json.load(open("bench/results/gemm_algos_h200.json"))
    rows = sorted(src["rows"], key=lambda r: -r["calls"] * r["torch_us"])
    r = rows[index]
    try:
        row = problem_row(parse(r["key"]), r["calls"])
    except Exception as e:  # noqa: BLE001
        row = {"key": r["key"], "calls": r["calls"], "error": repr(e)[:300]}
        print("ERROR", r["key"], repr(e)[:300], flush=True)
    row["card"], row["torch"] = torch.cuda.get_device_name(), torch.__version__
    json.dump(row, open(out_json, "w"), indent=1, default=str)


def merge(out_json: str, parts: list[str]) -> None:
    rows = []
    for f in parts:
        try:
            rows.append(json.load(open(f)))
        except (OSError, ValueError) as e:
            rows.append({"part": f, "error": repr(e)})
    step: dict[str, float] = {}
    for r in rows:
        for s, b in r.get("best_by_source", {}).items():
            step[s] = step.get(s, 0.0) + r["calls"] * min(b["us"], r["torch_us"])
    res = {"card": next((r["card"] for r in rows if "card" in r), None), "rows": rows,
           "step_us_torch": sum(r["calls"] * r["torch_us"] for r in rows if "torch_us" in r),
           "step_us_by_source": step}  # fmt: skip
    json.dump(res, open(out_json, "w"), indent=1, default=str)
    print("step µs (these problems): torch", round(res["step_us_torch"], 1), {k: round(v, 1) for k, v in step.items()})


if __name__ == "__main__":
    if sys.argv[1] == "merge":
        merge(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], int(sys.argv[2]))
