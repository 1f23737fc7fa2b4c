"""GPU correctness + timing of every attn_gluon variant next to cuDNN SDPA (SD 64x64 latent: B=2, H=8, N=4096, D=40).

usage:  python gpu_check.py OUT.json [variant ...]       (GPU; default: attn_gluon.ROUND3, i.e. the engine's
                                                          ws4_pp_narrow_bn64_fadd + the round-3 variants;
                                                          --round 2: attn_gluon.ROUND2; --all: every variant)
        python gpu_check.py --dry-run OUT.json            (CPU: exercises everything except the CUDA parts)

Phase 1 compiles (JIT) and smoke-checks every variant on the small odd shape in parallel subprocesses (--jobs,
killed after --compile-timeout; the Triton cache then serves phase 2); a variant that fails there is not measured.
Phase 2 measures one variant at a time, each in its own subprocess killed after --timeout.

Per variant (child process): random non-zero-mean qkv (randn*1.5+0.3, fp16), output poisoned with NaN, one call,
max |err| vs fp64 SDPA, PASS iff no NaN and err <= 2x the error of torch's fp16 SDPA on the same inputs; plus a
small odd shape (B=1, N=640: N not a multiple of the 192-row ws3 tile) for indexing bugs; then CUDA-graph timing
(20 calls per replay, median of 7 replays) of the variant and of cuDNN SDPA on q/k/v views of the same qkv.
The JSON (card, versions, date, rows) is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
B, H, N, D = 2, 8, 4096, 40
SMALL = (1, 8, 640, 40)
REPS, ITERS = 20, 7


def make_qkv(b: int, n: int, h: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, n, 3 * h * d, generator=g) * 1.5 + 0.3  # [B, N, 3HD]
    return x.half().to(device)


def qkv_views(qkv: torch.Tensor, h: int, d: int):
    # [B, N, 3HD] -> 3 x [B, H, N, D] strided views (no copies), as the engine would hand them to SDPA
    return [t.unflatten(-1, (h, d)).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


def reference(qkv: torch.Tensor, h: int, d: int) -> torch.Tensor:
    q, k, v = (t.double() for t in qkv_views(qkv, h, d))
    o = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D] fp64
    return o.transpose(1, 2).flatten(2)  # -> [B, N, H*D]


def sdpa16(qkv: torch.Tensor, h: int, d: int, backend=None) -> torch.Tensor:
    q, k, v = qkv_views(qkv, h, d)
    if backend is None:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).flatten(2)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item()


def err_breakdown(out: torch.Tensor, ref: torch.Tensor, h: int, d: int) -> dict:
    """Where is it wrong: max error per head and per 64-row query block mod 3 (which consumer)."""
    e = (out.double() - ref).abs().nan_to_num(1e9)  # [B, N, H*D]
    per_head = e.unflatten(-1, (h, d)).amax(dim=(0, 1, 3))
    rb = e.amax(dim=(0, 2)).unflatten(0, (-1, 64)).amax(1)  # [N/64]
    return dict(per_head=[round(x, 5) for x in per_head.tolist()],
                per_rowblock64_first8=[round(x, 5) for x in rb[:8].tolist()],
                per_rowblock64_last4=[round(x, 5) for x in rb[-4:].tolist()],
                frac_bad=(e > 0.01).double().mean().item())  # fmt: skip


def graph_time_us(fn, reps: int = REPS, iters: int = ITERS) -> float:
    """Per-call µs of fn replayed from a CUDA graph of `reps` back-to-back calls; median of `iters` replays."""
    sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "src"))  # speedsd (bench.common.graph_ms)
    from speedsd.bench.common import graph_ms

    return graph_ms(fn, calls=reps, reps=iters) * 1000


def cached(cache: str | None, key: str, fn, device: str = "cuda"):
    """fn() once per gpu_check run: children share fp64 references through files in the parent's temp dir."""
    path = os.path.join(cache, key + ".pt") if cache else None
    if path and os.path.exists(path):
        return torch.load(path, map_location=device)
    val = fn()
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"  # phase-1 children may race: each writes its own file
        torch.save(val, tmp)
        os.replace(tmp, path)
    return val


def child(name: str, dry: bool, cache: str | None = None, smoke_only: bool = False) -> dict:
    """Run one variant; returns a result row (never raises). smoke_only: compile + small shape only (phase 1)."""
    sys.path.insert(0, HERE)
    row: dict = dict(name=name)
    t0 = time.time()
    try:
        import attn_gluon as ag

        cfg = ag.VARIANTS[name]
        row["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        dev = "cpu" if dry else "cuda"
        if dry:  # CPU: launcher input checks + reference math on a tiny shape
            if os.environ.get("GPU_CHECK_TEST_HANG") == name:  # exercise the parent's timeout path
                time.sleep(3600)
            if smoke_only:
                import triton  # noqa: F401  (the import cost a real phase-1 child pays before compiling)

                row["status"] = "smoke-ok"
                return row
            qkv = make_qkv(1, 128, 2, D, dev)
            try:
                ag.attention_d40(qkv, 2, D, config=name)
                row["launcher_cpu"] = "no error (unexpected)"
            except ValueError as e:
                row["launcher_cpu"] = f"ValueError as expected: {e}"
            ref = cached(cache, "dry", lambda: reference(qkv, 2, D), device="cpu")
            row["ref_cached"] = bool(cache and os.path.exists(os.path.join(cache, "dry.pt")))
            row["ref_shape"] = list(ref.shape)
            row["err_fp32_math"] = max_err(sdpa16(qkv.float(), 2, D), ref)
            row["breakdown_demo"] = err_breakdown(ref.half(), ref, 2, D)
            row["status"] = "dry-ok"
            return row
        # small odd shape first (cheap; catches indexing / masking bugs before the timing run)
        bs, hs, ns, ds = SMALL
        qkv_s = make_qkv(bs, ns, hs, ds, dev, seed=1)
        ref_s = cached(cache, "small", lambda: reference(qkv_s, hs, ds))
        err16_s = max_err(sdpa16(qkv_s, hs, ds), ref_s)
        out_s = torch.full((bs, ns, hs * ds), float("nan"), device=dev, dtype=torch.float16)
        ag.attention_d40(qkv_s, hs, ds, out=out_s, config=name)
        torch.cuda.synchronize()
        row["small_nan"] = int(out_s.isnan().sum().item())
        row["small_err"] = max_err(out_s, ref_s)
        row["small_err_sdpa16"] = err16_s
        del ref_s
        if smoke_only:
            ok_s = row["small_nan"] == 0 and row["small_err"] <= 2 * max(err16_s, 1e-3)
            row["status"] = "smoke-ok" if ok_s else "smoke-WRONG"
            row["child_s"] = round(time.time() - t0, 1)
            return row

        qkv = make_qkv(B, N, H, D, dev)
        ref = cached(cache, "big", lambda: reference(qkv, H, D))
        err16 = max_err(sdpa16(qkv, H, D), ref)
        out = torch.full((B, N, H * D), float("nan"), device=dev, dtype=torch.float16)
        ag.attention_d40(qkv, H, D, out=out, config=name)
        torch.cuda.synchronize()
        k = ag.LAST_KERNEL
        row.update(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                   shared=getattr(getattr(k, "metadata", None), "shared", None))  # fmt: skip
        row["nan"] = int(out.isnan().sum().item())
        row["err"] = max_err(out, ref)
        row["err_sdpa16"] = err16
        ok = row["nan"] == 0 and row["err"] <= 2 * err16 and row["small_nan"] == 0
        ok = ok and row["small_err"] <= 2 * max(row["small_err_sdpa16"], 1e-3)
        row["pass"] = bool(ok)
        if not ok:
            row["breakdown"] = err_breakdown(out, ref, H, D)
        del ref
        row["us"] = graph_time_us(lambda: ag.attention_d40(qkv, H, D, out=out, config=name))
        row["us_sdpa_default"] = graph_time_us(lambda: sdpa16(qkv, H, D))
        try:
            from torch.nn.attention import SDPBackend

            row["us_sdpa_cudnn"] = graph_time_us(lambda: sdpa16(qkv, H, D, SDPBackend.CUDNN_ATTENTION))
        except Exception as e:  # noqa: BLE001
            row["us_sdpa_cudnn"] = f"error: {str(e).splitlines()[0][:120]}"
        row["status"] = "ok" if ok else "WRONG"
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {' / '.join(msg[-8:])[:2000]}"
    row["child_s"] = round(time.time() - t0, 1)
    return row


def _variants(everything: bool, rnd: int = 3) -> list[str]:
    sys.path.insert(0, HERE)
    import attn_gluon as ag

    return list(ag.VARIANTS) if everything else list(ag.ROUND2 if rnd == 2 else ag.ROUND3)


def _run_child(cmd: list[str], name: str, timeout: float) -> dict:
    """One child process; its RESULT row, or a row saying why there is none (timeout: killed)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as log:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT:")]
            if lines:
                row = json.loads(lines[-1][len("RESULT:") :])
            else:
                log.seek(0)
                row = dict(name=name, status=f"child died rc={p.returncode}", stderr_tail=log.read()[-1500:])
        except subprocess.TimeoutExpired:
            row = dict(name=name, status=f"TIMEOUT after {timeout:.0f}s (hang/deadlock?)")
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def _kinds() -> dict[str, str]:
    sys.path.insert(0, HERE)
    import attn_gluon as ag

    return {k: v.kind for k, v in ag.VARIANTS.items()}


def header(dry: bool) -> dict:
    import triton

    card = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    return dict(card=card, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now().isoformat(timespec="seconds"), shape=[B, H, N, D],
                timing=f"CUDA graph of {REPS} calls, median of {ITERS} replays", rows=[])  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per variant (child is killed after)")
    ap.add_argument("--budget", type=float, default=285.0, help="seconds for all variants (both phases)")
    ap.add_argument("--all", action="store_true", help="every variant in attn_gluon.VARIANTS (default: ROUND3)")
    ap.add_argument("--round", type=int, default=3, choices=(2, 3), help="default list: attn_gluon.ROUND2 / ROUND3")
    ap.add_argument("--jobs", type=int, default=8, help="phase 1: parallel compile + smoke children")
    ap.add_argument("--compile-timeout", type=float, default=150.0, help="phase 1: seconds per child")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT:" + json.dumps(child(a.child, a.dry_run, a.cache, a.smoke)), flush=True)
        return 0
    names = a.variants or _variants(a.all, a.round)
    res = header(a.dry_run)
    t_end = time.time() + a.budget
    cache = tempfile.mkdtemp(prefix="gluon_attn_ref_")
    kinds = _kinds()
    base = [sys.executable, os.path.abspath(__file__), a.out, "--cache", cache] + (["--dry-run"] if a.dry_run else [])
    # phase 1: JIT compile + small-shape smoke check, in parallel (the Triton cache then serves phase 2)
    t1 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        smoke = dict(zip(names, pool.map(lambda n: _run_child(base + ["--child", n, "--smoke"], n, a.compile_timeout),
                                         names)))  # fmt: skip
    res["phase1_s"] = round(time.time() - t1, 1)
    res["phase1"] = {n: {k: r.get(k) for k in ("status", "small_err", "small_err_sdpa16", "wall_s", "error")}
                     for n, r in smoke.items()}  # fmt: skip
    print(f"phase 1 (compile + smoke, {a.jobs} jobs) {res['phase1_s']} s: "
          + ", ".join(f"{n}={r.get('status')}" for n, r in smoke.items()), flush=True)  # fmt: skip
    ws_timeouts = 0
    for name in names:
        if smoke[name].get("status") != "smoke-ok":
            row = dict(smoke[name], name=name, status=f"phase 1: {smoke[name].get('status')}")
            res["rows"].append(row)
            print(_fmt(row), flush=True)
            continue
        left = t_end - time.time()
        if left < 15:
            res["rows"].append(dict(name=name, status="skipped (budget)"))
            continue
        if ws_timeouts >= 2 and kinds.get(name) == "ws":  # the WS protocol hangs: keep the time for the rest
            res["rows"].append(dict(name=name, status="skipped (2 ws variants timed out)"))
            continue
        row = _run_child(base + ["--child", name], name, min(a.timeout, left))
        ws_timeouts += row["status"].startswith("TIMEOUT") and kinds.get(name) == "ws"
        res["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(_fmt(row), flush=True)
    print("\nname                 status   us      sdpa   cudnn   err      err16    regs spills")
    for r in res["rows"]:
        print(_fmt(r))
    ok = [r for r in res["rows"] if r.get("pass") and isinstance(r.get("us"), float)]
    if ok:
        best = min(ok, key=lambda r: r["us"])
        print(f"best passing: {best['name']} {best['us']:.1f} us vs cuDNN {best.get('us_sdpa_cudnn')} us")
    return 0


def _fmt(r: dict) -> str:
    def f(x, w=7, p=1):
        return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{str(x)[:w]:>{w}}"

    return (f"{r['name']:<20} {str(r.get('status'))[:8]:<8} {f(r.get('us'))} {f(r.get('us_sdpa_default'))} "
            f"{f(r.get('us_sdpa_cudnn'))} {f(r.get('err'), 8, 5)} {f(r.get('err_sdpa16'), 8, 5)} "
            f"{f(r.get('n_regs'), 4, 0)} {f(r.get('n_spills'), 4, 0)}"
            + (f"  {r.get('error', '')[:300]}" if r.get("error") else ""))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
