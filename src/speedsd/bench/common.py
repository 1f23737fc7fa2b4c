"""What every benchmark shares: timing, the card's measured ceilings, environment facts, result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 30) -> float:
    """Median wall time of ``fn`` in ms. CUDA: events around each call; CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(rep):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], object], calls: int = 20, runs: int = 7, warmup: int = 3) -> float:
    """Per-call ms of ``calls`` calls issued back to back (no host sync between them), median of ``runs``.

    :func:`median_ms` syncs after every call, so each sample also holds the GPU's wait for the host to issue the
    call (input copies, a graph launch; torch.compile's cudagraph trees spend ~2 ms of host time a UNet call,
    bench/results/step_timing_h200.json). Back to back, the host issues the next call while the GPU runs this one:
    the figure is what a denoising loop pays per call when the GPU is the limit. CUDA: events around the run;
    CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def do_bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median kernel time in ms via triton.testing.do_bench (flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


L2_BYTES = 50 * 2**20  # an H100's or H200's L2


def copies_out_of_l2(nbytes: int, most: int = 8) -> int:
    """How many copies of an operand of ``nbytes`` bytes to cycle call by call so that each call reads its own from
    memory, as in a model step: three L2s' worth, 1 .. ``most``."""
    return max(1, min(most, math.ceil(3 * L2_BYTES / nbytes)))


def cycled_graph_ms(fn_for: Callable[[Any], object], items: list, reps: int = 10) -> float:
    """:func:`graph_ms` of ``fn_for(items[i % len(items)])`` for call i (two rounds of the items a graph)."""
    state = {"i": 0}

    def call() -> None:
        fn_for(items[state["i"] % len(items)])
        state["i"] += 1

    return graph_ms(call, calls=2 * len(items), reps=reps)


def graph_ms(fn: Callable[[], object], calls: int = 20, reps: int = 10) -> float:
    """Per-call ms of ``fn`` replayed from a CUDA graph of ``calls`` back-to-back calls (no Python
    launcher cost, no L2 flush: what the engine's graph replay pays). Median over ``reps`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, allocator) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return float(statistics.median(times))


def copy_bandwidth_gbs(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms = do_bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str:
    """The code's commit: $SPEEDSD_COMMIT when set (a tree copied without its git metadata), else git's."""
    if os.environ.get("SPEEDSD_COMMIT"):
        return os.environ["SPEEDSD_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    """Card, versions, date and commit: what every committed result names."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["card"] = p.name
        env["sm_count"] = p.multi_processor_count
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["card"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def kernel_bench_args(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every kernel bench shares: ``--out DIR`` and ``--smoke``."""
    ap = argparse.ArgumentParser(prog=f"python -m speedsd.bench.{name}", description=(doc or name).splitlines()[0])
    ap.add_argument("--out", default="bench/results", help=f"directory for {name}.{{json,md}}")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (works on CPU with TRITON_INTERPRET=1)")
    return ap


def device_and_smoke(smoke: bool) -> tuple[str, bool]:
    """The bench's device, and whether to run the tiny shapes (always on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, smoke or device == "cpu"


def publish(out_dir: str | Path, name: str, payload: dict[str, Any], markdown: str, ok: bool) -> int:
    """Write the results, print the markdown, and return the exit status (1 when anything was wrong)."""
    write_results(out_dir, name, payload, markdown)
    print(markdown)
    return 0 if ok else 1


def write_results(out_dir: str | Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``name.json`` (payload + environment) and ``name.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    jp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload["environment"]
    head = (
        f"<!-- generated by speedsd.bench; card: {env['card']}; torch {env['torch']}; triton {env['triton']}; "
        f"commit {env['commit']}; {env['date']} -->\n"
    )
    mp.write_text(head + markdown.rstrip() + "\n")
    return jp, mp


def guard(errors: list[dict[str, str]], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args); on an exception record it in ``errors`` (the rest of the bench still runs), return None."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a failing shape must not hide the others
        errors.append({"what": what, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})
        print(f"ERROR {what}: {type(e).__name__}: {e}", flush=True)
        return None


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; inf if out has NaN/inf."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
