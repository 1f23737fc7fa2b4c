"""Crash-isolating correctness sweep of the attention kernels on the GPU (names the first bad case).

    CUDA_LAUNCH_BLOCKING=1 python -m speedsd.bench.attention_debug --out DIR      # < 60 s

Runs every SD attention shape (kernels_attention.SHAPES + LONG_SHAPES) and the unit-test shapes
through flash and partial in fp16, bf16 and fp32, one case at a time: prints the shape, variant and
launch config *before* launching, synchronizes after, and compares against the materialized
reference (fp64 on a subset of query rows for long sequences). Then it tries risky flash configs
(the pre-fix 128+32 / 32+16 head-dim splits, 2 stages, padded head dims) on the SD shapes.

An illegal memory access kills the CUDA context, so the cases run in a worker subprocess: when the
worker dies, the parent records the case that was in flight as CRASH and starts a fresh worker at
the next case. The final table lists every case: ok / FAIL (numerics) / ERROR (Python exception) /
CRASH (context lost) / SKIP (time budget, not a failure). Exit code 1 if a default-config case ran
and is not ok.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

CASE_PREFIX = "@@CASE "
DONE_PREFIX = "@@DONE "

# Unit-test shapes (tests/kernels/test_flash_attention.py), labelled like the bench shapes.
TEST_SHAPES = [
    ("test self-d40", 1, 2, 64, 64, 40),
    ("test cross77-d64", 1, 2, 50, 77, 64),
    ("test odd-d80", 1, 1, 33, 19, 80),
    ("test small-d160", 1, 1, 20, 40, 160),
    ("test vae-d512", 2, 1, 17, 9, 512),
]


def cases() -> list[dict[str, Any]]:
    """Every case in priority order (the time budget skips the tail): default launch configs on the
    SD shapes in fp16 then bf16 (what the engine runs), the unit-test shapes in fp16/bf16/fp32, the
    two pre-fix crash configs, the forced-config sweep, and last the SD shapes in fp32 (FMA dots;
    the engine never runs fp32). Flash on D > 256 is the partial kernel itself, so it is not repeated."""
    from speedsd.bench.kernels_attention import LONG_SHAPES, SHAPES

    out: list[dict[str, Any]] = []

    def add(shape, variant, dtype, config=None):
        label, B, H, Nq, Nk, D = shape
        if variant == "flash" and D > 256 and config is None:
            return  # routed to partial: same kernels as the partial case of this shape
        out.append(dict(label=label, shape=(B, H, Nq, Nk, D), variant=variant, dtype=dtype, config=config))

    for dtype in ("float16", "bfloat16"):
        for s in SHAPES + LONG_SHAPES:
            for variant in ("flash", "partial"):
                add(s, variant, dtype)
    for dtype in ("float16", "bfloat16", "float32"):
        for s in TEST_SHAPES:
            for variant in ("flash", "partial"):
                add(s, variant, dtype)
    # Forced flash configs (block_m, block_n, warps, stages, split_d, chunk32). First the pre-fix
    # defaults on the two cases that crashed on the H200 (d=160 128+32 split at 2 stages; d=40 32+16),
    # then a sweep over which knob matters.
    by_label = {s[0]: s for s in SHAPES + TEST_SHAPES}
    add(by_label["test small-d160"], "flash", "float16", [64, 32, 4, 2, True, True])
    add(by_label["self 4096 d40"], "flash", "float16", [128, 64, 4, 3, True, True])
    risky = [
        (64, 32, 4, 3, True, True),
        (64, 32, 4, 1, True, True),
        (128, 64, 8, 3, True, True),
        (64, 64, 4, 3, False, False),
        (128, 64, 4, 2, True, False),
    ]
    for cfg in risky:
        for s in SHAPES[:7] + TEST_SHAPES[:4]:
            if s[5] in (40, 160) or (s[5] == 80 and not cfg[5]):
                add(s, "flash", "float16", list(cfg))
    for s in SHAPES:
        for variant in ("flash", "partial"):
            add(s, variant, "float32")
    return out


def _heads(B: int, H: int, N: int, D: int, dtype, std: float, g):
    """Head-split view of a [B, N, H·D] projection, as the model passes q/k/v."""
    import torch

    t = torch.randn(B, N, H * D, device="cuda", generator=g) * std + 0.3  # [B, N, H·D]
    return t.to(dtype).unflatten(-1, (H, D)).transpose(1, 2)  # -> [B, H, N, D] view


def _compare(q, k, v, out, dtype) -> tuple[str, str]:
    """ok/FAIL against the fp64 materialized softmax; fp16/bf16 bar: 2x torch's materialized error."""
    import torch

    from speedsd.kernels.softmax_attention import attention_ref

    Nq = q.shape[2]
    rows = torch.arange(Nq, device=q.device)
    if Nq > 1024:  # reference on ~512 rows (first, last and spread) keeps the fp64 check cheap
        rows = torch.unique(torch.cat([rows[:192], rows[-128:], rows[:: max(1, Nq // 192)]]))
    qs, os_ = q[:, :, rows], out[:, :, rows]
    ref = attention_ref(qs.double(), k.double(), v.double())
    finite = bool(torch.isfinite(os_).all())
    err = (os_.double() - ref).abs().max().item() if finite else float("inf")
    if dtype == torch.float32:
        bar = 1e-4
    else:  # torch materialized in this dtype
        bar = 2 * (attention_ref(qs, k, v).double() - ref).abs().max().item() + 1e-3
    return ("ok" if finite and err <= bar else "FAIL"), f"max err {err:.3g} (bar {bar:.3g})"


def _worker(start: int, budget_s: float, t0: float) -> int:
    import torch

    from speedsd.kernels.flash_attention import (
        MAX_FLASH_HEAD_DIM,
        FlashConfig,
        flash_attention,
        flash_config,
        split_head_dim,
    )
    from speedsd.kernels.softmax_attention import _pv_config, _scores_config, attention_partial_softmax

    all_cases = cases()
    for i in range(start, len(all_cases)):
        c = all_cases[i]
        B, H, Nq, Nk, D = c["shape"]
        dtype = getattr(torch, c["dtype"])
        head = f"{i}/{len(all_cases)} {c['label']} {c['shape']} {c['variant']} {c['dtype']}"
        if time.time() - t0 > budget_s:
            print(DONE_PREFIX + json.dumps({"i": i, "status": "SKIP", "info": "time budget"}), flush=True)
            continue
        tc = time.time()
        try:  # setup errors (not kernel crashes) are this case's ERROR, never the worker's death
            g = torch.Generator(device="cuda").manual_seed(i)
            q, k, v = (_heads(B, H, n, D, dtype, std, g) for n, std in ((Nq, 1.5), (Nk, 1.5), (Nk, 1.0)))
            cfg = FlashConfig(*c["config"]) if c["config"] else None
            if c["variant"] == "flash" and D <= MAX_FLASH_HEAD_DIM:
                eff = cfg or flash_config(q, Nk)
                info = f"{eff} chunks={split_head_dim(D, eff.split_d, eff.chunk32)}"
            else:  # flash routes D > 256 to the partially fused softmax
                pre = "-> partial: " if c["variant"] == "flash" else ""
                info = f"{pre}scores {_scores_config(q, Nk)} pv {_pv_config(q, Nk)}"
        except Exception as e:
            msg = f"setup: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            print(CASE_PREFIX + json.dumps({"i": i, "head": head, "info": "-"}), flush=True)
            print(DONE_PREFIX + json.dumps({"i": i, "status": "ERROR", "info": msg}), flush=True)
            continue
        print(CASE_PREFIX + json.dumps({"i": i, "head": head, "info": info}), flush=True)
        print(f"[{i}] {head} :: {info}", flush=True)
        torch.cuda.synchronize()
        try:
            if c["variant"] == "flash":
                out = flash_attention(q, k, v, config=cfg)
            else:
                out = attention_partial_softmax(q, k, v)
            torch.cuda.synchronize()
        except Exception as e:  # an illegal access raises here too, but the context is gone: exit
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            fatal = "illegal" in msg or "CUDA error" in msg or "AcceleratorError" in msg
            print(DONE_PREFIX + json.dumps({"i": i, "status": "CRASH" if fatal else "ERROR", "info": msg}), flush=True)
            if fatal:
                return 3
            continue
        try:
            status, info = _compare(q, k, v, out, dtype)
        except Exception as e:  # reference out of memory etc.: the kernel itself ran
            status, info = "ERROR", f"reference: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        info += f"; {time.time() - tc:.1f} s"
        print(DONE_PREFIX + json.dumps({"i": i, "status": status, "info": info}), flush=True)
        del q, k, v, out
    return 0


def _parent(args: argparse.Namespace) -> int:
    all_cases = cases()
    results: dict[int, dict[str, Any]] = {}
    infos: dict[int, str] = {}
    start, t0, restarts = 0, time.time(), 0
    while start < len(all_cases):
        cmd = [sys.executable, "-m", "speedsd.bench.attention_debug", "--worker", str(start)]
        cmd += ["--budget", str(args.budget), "--t0", str(t0)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        in_flight, last_case = None, None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(CASE_PREFIX):
                d = json.loads(line[len(CASE_PREFIX) :])
                in_flight = last_case = d["i"]
                infos[d["i"]] = d["head"] + " :: " + d["info"]
            elif line.startswith(DONE_PREFIX):
                d = json.loads(line[len(DONE_PREFIX) :])
                results[d["i"]] = d
                in_flight = None if d["i"] == in_flight else in_flight
                print(f"    -> {d['status']} {d.get('info', '')}", flush=True)
            else:
                print("    | " + line.rstrip(), flush=True)
        rc = proc.wait()
        if rc == 0:
            break
        if in_flight is not None:
            crashed = in_flight
            results[crashed] = {"i": crashed, "status": "CRASH", "info": f"worker died in flight (rc {rc})"}
        elif last_case is not None and results.get(last_case, {}).get("status") == "CRASH":
            crashed = last_case
        else:
            print(f"!! worker exited with rc {rc} outside any case; stopping", flush=True)
            break
        print(f"!! case {crashed} crashed the worker (rc {rc}); restarting at {crashed + 1}", flush=True)
        start, restarts = crashed + 1, restarts + 1
        if restarts > args.max_restarts:
            print("!! too many crashes; giving up on the rest", flush=True)
            break
    rows = []
    for i, c in enumerate(all_cases):
        r = results.get(i, {"status": "SKIP", "info": "not reached"})
        rows.append(
            {
                "i": i,
                "label": c["label"],
                "shape": c["shape"],
                "variant": c["variant"],
                "dtype": c["dtype"],
                "config": c["config"],
                "launch": infos.get(i, ""),
                "status": r["status"],
                "info": r.get("info", ""),
            }
        )
    skipped = [r for r in rows if r["status"] == "SKIP"]  # time budget / not reached: listed, not failures
    bad = [r for r in rows if r["status"] not in ("ok", "SKIP")]
    default_bad = [r for r in bad if r["config"] is None]
    from speedsd.bench.common import md_table, write_results

    md = "\n\n".join(
        [
            f"# Attention debug sweep: {len(rows) - len(bad) - len(skipped)}/{len(rows)} ok, {len(bad)} not ok, "
            f"{len(skipped)} skipped (time budget), {restarts} worker restarts, {time.time() - t0:.0f} s",
            f"Default launch configs (of those run): {'ALL OK' if not default_bad else f'{len(default_bad)} not ok'}",
            md_table(
                ["#", "shape", "variant", "dtype", "forced config", "status", "info"],
                [
                    [r["i"], r["label"], r["variant"], r["dtype"], r["config"] or "-", r["status"], r["info"][:80]]
                    for r in (bad or rows[:0])
                ],
            )
            if bad
            else "(no failures)",
        ]
    )
    if args.out:
        write_results(args.out, "attention_debug", {"rows": rows, "restarts": restarts}, md)
    print(md)
    print("\nall cases:")
    for r in rows:
        print(f"  {r['i']:3d} {r['status']:5s} {r['label']:22s} {r['variant']:7s} {r['dtype']:8s} {r['config'] or ''}")
    return 1 if default_bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for attention_debug.{json,md}")
    ap.add_argument("--budget", type=float, default=45.0, help="seconds; later cases are skipped")
    ap.add_argument("--max-restarts", type=int, default=12)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        for i, c in enumerate(cases()):
            print(i, c)
        return 0
    if args.worker is not None:
        return _worker(args.worker, args.budget, args.t0 or time.time())
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("attention_debug needs a CUDA GPU (use --list to see the cases)")
    if os.environ.get("CUDA_LAUNCH_BLOCKING") != "1":
        print("note: run with CUDA_LAUNCH_BLOCKING=1 so a fault is reported at its own launch", flush=True)
    return _parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
