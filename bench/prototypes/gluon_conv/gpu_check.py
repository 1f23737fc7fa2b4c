"""GPU check of conv_gluon's variants on Stable Diffusion's big 3x3 convs (fp16, channels_last, no bias).

    python gpu_check.py OUT.json [--variants ws,ws2,...] [--shapes vae_128_512,...] [--budget 330]
        a variant may carry config overrides: --variants "ws2,ws2@stages=3,ws@th=16+tw=8"
    python gpu_check.py --cpu-selftest          (no GPU: imports, shapes, tensor builders, JSON writing)

For every variant and shape, plain (y = conv(x)) and with the prologue (y = conv(silu(x·scale + shift))):
  * correctness: output poisoned with NaN, every element must be written; relative error ||y − ref|| / ||ref||
    against an fp32 reference (TF32 off) must be <= 2x the error of the fp16 torch path on the same inputs
    (cuDNN fp16 conv; with the prologue: the activation rounded to fp16, then cuDNN);
  * timing: CUDA-graph replay of 20 calls, median of 7 replays, next to cuDNN F.conv2d (no bias) on the same
    tensors and, for the prologue, next to "normalize + cuDNN" (one Triton pass writing silu(x·scale + shift)
    in fp16, then F.conv2d).
Phase 1 compiles every variant in parallel subprocesses (tiny smoke shapes, also checked for correctness, including
partial tiles and a batch of 2); phase 2 measures each variant in its own subprocess with a timeout, so a hang or a
crash costs one variant. OUT.json (card, versions, date, rows) is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "src"))  # speedsd (bench.common.graph_ms)

# (label, N, C, H, W, Co): the VAE decoder's big convs and the UNet's 320-channel conv
SHAPES = [
    ("vae_128_512", 1, 128, 512, 512, 128),
    ("vae_256to128_512", 1, 256, 512, 512, 128),
    ("vae_256_256", 1, 256, 256, 256, 256),
    ("vae_512to256_256", 1, 512, 256, 256, 256),
    ("vae_512_128", 1, 512, 128, 128, 512),
    ("unet_320_64_b2", 2, 320, 64, 64, 320),
]
# smoke shapes for phase 1 (compile + correctness): one per Co class, partial tiles (W = 40, H = 24), batch 2
SMOKE = [
    ("smoke_co128", 2, 128, 24, 40, 128),
    ("smoke_co256", 1, 256, 32, 48, 256),
    ("smoke_co512", 1, 128, 16, 16, 512),
    ("smoke_co320", 2, 320, 24, 40, 320),
]
DEFAULT_VARIANTS = ["ws", "ws_np", "ws2", "ws2_np", "ws2_t32", "ws2_t16", "ws_t16"]
MODES = ("plain", "gn_silu")
CALLS, REPS = 20, 7


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(n: int, c: int, h: int, w: int, co: int, device: str, seed: int = 0):
    """x = randn·2 + 0.5 (non-zero mean), weight ~ N(0, 1/(9C)), scale/shift as GroupNorm would fold them
    for this x (scale ≈ γ / std, shift ≈ β − mean·scale) with some spread across channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).half()
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5).half()
    scale = 0.5 * (1 + 0.2 * torch.randn(n, c, generator=g))
    shift = -0.25 * scale / 0.5 + 0.1 * torch.randn(n, c, generator=g)
    cl = torch.channels_last
    return (x.to(device).contiguous(memory_format=cl), wt.to(device).contiguous(memory_format=cl),
            scale.float().to(device).contiguous(), shift.float().to(device).contiguous())  # fmt: skip


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def torch_fp16_path(x, wt, scale, shift, mode: str) -> torch.Tensor:
    """What the engine does without the fusion: the activation stored in fp16, then cuDNN."""
    if mode == "plain":
        return F.conv2d(x, wt, padding=1)
    a = F.silu(x.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)
    return F.conv2d(a.contiguous(memory_format=torch.channels_last), wt, padding=1)


# ----------------------------------------------------------------------------------------------- timing
def graph_us(fn, calls: int = CALLS, reps: int = REPS) -> float:
    """Per-call µs of fn replayed from a CUDA graph of `calls` back-to-back calls; median of `reps` replays."""
    from speedsd.bench.common import graph_ms

    return graph_ms(fn, calls=calls, reps=reps) * 1000


def _normalize_kernel():
    """One Triton pass: a = silu(x·scale[n, c] + shift[n, c]) in fp16, channels_last x seen as [N·H·W, C]."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gn_silu_apply(x_ptr, sc_ptr, sh_ptr, y_ptr, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(2)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p < HW)[:, None] & (c < C)[None, :]
        offs = (b * HW + p).to(tl.int64)[:, None] * C + c[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = v * tl.load(sc_ptr + b * C + c, mask=c < C)[None, :] + tl.load(sh_ptr + b * C + c, mask=c < C)[None, :]
        v = v * tl.sigmoid(v)
        tl.store(y_ptr + offs, v.to(tl.float16), mask=mask)

    def apply(x, scale, shift, out):
        n, c, h, w = x.shape
        grid = (triton.cdiv(h * w, 64), triton.cdiv(c, 128), n)
        _gn_silu_apply[grid](x, scale, shift, out, h * w, c, BLOCK_P=64, BLOCK_C=128, num_warps=4)
        return out

    return apply


# ----------------------------------------------------------------------------------------------- worker
def resolve(variant, name: str, co: int, **variant_kw):
    """A variant name, optionally with overrides: 'ws2@stages=3+th=16' = variant('ws2', co, ...) with those fields."""
    import dataclasses

    base, _, over = name.partition("@")
    cfg = variant(base, co, **variant_kw)
    changes = {}
    for item in filter(None, over.split("+")):
        key, val = item.split("=")
        old = getattr(cfg, key)
        changes[key] = (val == "True") if isinstance(old, bool) else type(old)(val) if old is not None else int(val)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def time_row(row: dict, run, x, wt, scale, shift, pro: bool, normalize, flops: float) -> None:
    """Graph-replay timings of ``run()`` (the Gluon conv under test), cuDNN and (with the prologue) normalize +
    cuDNN, into row."""
    row["us"] = graph_us(run)
    row["tflops"] = flops / row["us"] * 1e-6
    row["cudnn_us"] = graph_us(lambda: F.conv2d(x, wt, padding=1))
    row["cudnn_tflops"] = flops / row["cudnn_us"] * 1e-6
    row["speedup_vs_cudnn"] = row["cudnn_us"] / row["us"]
    if pro:
        act = torch.empty_like(x)

        def normalize_then_cudnn():
            normalize(x, scale, shift, act)
            return F.conv2d(act, wt, padding=1)

        row["normalize_us"] = graph_us(lambda: normalize(x, scale, shift, act))
        row["normalize_cudnn_us"] = graph_us(normalize_then_cudnn)
        row["speedup_vs_normalize_cudnn"] = row["normalize_cudnn_us"] / row["us"]


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def run_worker(name: str, shapes, timing: bool) -> None:
    """Check (and time) one variant on `shapes`, one ROW line per (shape, mode) on stdout."""
    import conv_gluon as cg

    check_variant(
        name, shapes, timing, MODES,
        conv=lambda x, wt, cfg, out, **kw: cg.conv3x3_gluon(x, wt, config=cfg, out=out, **kw),
        config=lambda co, pro: resolve(cg.variant, name, co, prologue=pro),
        fields=("th", "tw", "bn", "bk", "stages", "consumers", "persistent", "epi_split", "silu_impl"),
        plain_kw={},
    )  # fmt: skip


def check_variant(name: str, shapes, timing: bool, modes, *, conv, config, fields, plain_kw: dict) -> None:
    """The worker of this harness and of ../gluon_conv_halo's: per shape and mode, ``conv(x, wt, cfg, out, **kw)``
    (kw: the prologue's scale, shift, silu=True, or ``plain_kw``) with ``cfg = config(Co, prologue)`` into a
    NaN-poisoned out; error vs conv_gluon's fp32 reference next to the fp16 torch path's; timings (time_row)."""
    import conv_gluon

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    normalize = _normalize_kernel() if timing else None
    for label, n, c, h, w, co in shapes:
        try:
            x, wt, scale, shift = make_inputs(n, c, h, w, co, "cuda")
        except Exception as e:  # e.g. out of memory: report and go on with the next shape
            for mode in modes:
                emit(dict(variant=name, shape=label, mode=mode, ok=False, error=f"inputs: {type(e).__name__}: {e}"))
            continue
        flops = 2.0 * n * h * w * co * 9 * c
        for mode in modes:
            pro = mode != "plain"
            kw = dict(scale=scale, shift=shift, silu=True) if pro else plain_kw
            row = dict(variant=name, shape=label, N=n, C=c, H=h, W=w, Co=co, mode=mode)
            try:
                cfg = config(co, pro)
                row["config"] = {k: getattr(cfg, k) for k in fields}
                out = torch.full((n, co, h, w), float("nan"), dtype=torch.float16, device="cuda")
                out = out.contiguous(memory_format=torch.channels_last)
                t0 = time.time()
                conv(x, wt, cfg, out, **kw)
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.time() - t0, 2)  # compile (or cache load) + run
                ref = conv_gluon.conv3x3_gluon_ref(x, wt, **kw)  # fp32, activation not rounded
                base = torch_fp16_path(x, wt, scale, shift, mode)
                row["all_written"] = bool(torch.isfinite(out).all())
                row["err"] = rel_err(out, ref)
                row["torch_fp16_err"] = rel_err(base, ref)
                row["ok"] = row["all_written"] and row["err"] <= 2 * row["torch_fp16_err"]
                del ref
                if timing:
                    run = functools.partial(conv, x, wt, cfg, out, **kw)
                    time_row(row, run, x, wt, scale, shift, pro, normalize, flops)
            except Exception as e:  # one failing (shape, mode) does not stop the variant
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            emit(row)


# ----------------------------------------------------------------------------------------------- parent
def environment() -> dict:
    import triton

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(card=p.name, sms=p.multi_processor_count, cc=f"{p.major}.{p.minor}")
    else:
        env.update(card="none (CPU)")
    return env


class Results:
    def __init__(self, path: str) -> None:
        self.path = path
        self.payload = dict(env=environment(), rows=[], failures=[])
        self.lock = threading.Lock()  # phase 1's smoke threads report rows concurrently

    def add(self, row: dict) -> None:
        self.payload["rows"].append(row)
        self.write()

    def fail(self, what: str, detail: str) -> None:
        self.payload["failures"].append(dict(what=what, detail=detail[-3000:]))
        self.write()

    def write(self) -> None:
        with self.lock:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.payload, f, indent=1)
            os.replace(tmp, self.path)


def run_child(args: list[str], timeout: float, on_row, script: str = __file__) -> tuple[int | None, str]:
    """Run `script` (this one; ../gluon_conv_halo's reuses it) as a worker; hand every ROW line to on_row as it
    arrives; kill it after `timeout` s."""
    script = os.path.abspath(script)
    cmd = [sys.executable, script, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         cwd=os.path.dirname(script))  # fmt: skip
    tail: list[str] = []
    deadline = time.time() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.time()
        if left <= 0:
            p.kill()
            p.wait()
            return None, "".join(tail[-40:]) + f"\n[killed after {timeout:.0f} s]"
        if not sel.select(timeout=min(left, 1.0)):
            if p.poll() is not None:
                break
            continue
        line = p.stdout.readline()
        if not line:
            if p.poll() is not None:
                break
            continue
        if line.startswith("ROW "):
            on_row(json.loads(line[4:]))
        else:
            tail.append(line)
    rest = p.stdout.read()
    if rest:
        tail.append(rest)
    return p.wait(), "".join(tail[-40:])


def summary(rows: list[dict]) -> str:
    lines = [f"{'variant':8} {'shape':18} {'mode':8} {'ok':>3} {'err':>8} {'fp16err':>8} {'us':>8} {'TF/s':>6} "
             f"{'cudnn':>8} {'x cudnn':>7} {'norm+cudnn':>10} {'x n+c':>6}"]  # fmt: skip

    def f(r: dict, k: str, fmt: str) -> str:
        return format(r[k], fmt) if isinstance(r.get(k), (int, float)) else "-"

    for r in rows:
        if r.get("shape", "").startswith("smoke"):
            continue
        lines.append(f"{r['variant']:8} {r['shape']:18} {r['mode']:8} {'y' if r.get('ok') else 'N':>3} "
                     f"{f(r, 'err', '8.1e')} {f(r, 'torch_fp16_err', '8.1e')} {f(r, 'us', '8.1f')} "
                     f"{f(r, 'tflops', '6.0f')} {f(r, 'cudnn_us', '8.1f')} {f(r, 'speedup_vs_cudnn', '7.2f')} "
                     f"{f(r, 'normalize_cudnn_us', '10.1f')} {f(r, 'speedup_vs_normalize_cudnn', '6.2f')}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; no new variant starts after this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=None, help="comma list of shape labels (default: all)")
    ap.add_argument("--cpu-selftest", action="store_true")
    a = ap.parse_args()
    if a.cpu_selftest:
        return cpu_selftest()
    shapes = SHAPES if not a.shapes else [s for s in SHAPES if s[0] in a.shapes.split(",")]
    if a.worker:
        run_worker(a.worker, SMOKE if a.smoke else shapes, timing=not a.smoke)
        return 0
    if not a.out:
        ap.error("OUT.json is required")
    return run_variants(a.out, a.variants.split(","), a.budget, [], ["--shapes", a.shapes] if a.shapes else [],
                        smoke_timeout=150, measure_timeout=90)  # fmt: skip


def run_variants(out: str, names: list[str], budget: float, extra_args: list[str], shape_arg: list[str], *,
                 smoke_timeout: float, measure_timeout: float, script: str = __file__) -> int:  # fmt: skip
    """The parent of this harness and of ../gluon_conv_halo's: phase 1 compiles and smoke-checks every variant in
    parallel workers (``script --worker NAME --smoke``), phase 2 measures them one at a time within ``budget`` s;
    every ROW into OUT.json as it arrives."""
    t_start = time.time()
    res = Results(out)

    # phase 1: compile + smoke-check every variant in parallel (the Triton cache then serves phase 2)
    def smoke(name):
        rc, log = run_child(["--worker", name, "--smoke", *extra_args], smoke_timeout, res.add, script=script)
        if rc != 0:
            res.fail(f"smoke {name}", f"rc={rc}\n{log}")
        return name, rc

    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        smoke_rc = dict(pool.map(smoke, names))
    print(f"phase 1 (compile + smoke) done in {time.time() - t_start:.0f} s: {smoke_rc}", flush=True)
    # phase 2: one variant at a time (timings must not overlap)
    for name in names:
        if time.time() - t_start > budget:
            res.fail(f"measure {name}", "skipped: time budget spent")
            continue
        if smoke_rc.get(name) != 0:
            res.fail(f"measure {name}", "skipped: smoke phase failed")
            continue
        rc, log = run_child(["--worker", name, *shape_arg, *extra_args], measure_timeout, res.add, script=script)
        if rc != 0:
            res.fail(f"measure {name}", f"rc={rc}\n{log}")
        print(f"{name}: rc={rc} at {time.time() - t_start:.0f} s", flush=True)
    print(summary(res.payload["rows"]))
    smoke_bad = [r for r in res.payload["rows"] if r.get("shape", "").startswith("smoke") and not r.get("ok")]
    print(f"smoke failures: {len(smoke_bad)}; other failures: {len(res.payload['failures'])}; "
          f"total {time.time() - t_start:.0f} s")  # fmt: skip
    return 0


def cpu_selftest() -> int:
    """No GPU: the module imports, variants fit every shape, inputs build, the reference and the JSON path work."""
    import tempfile

    import conv_gluon as cg

    for name in DEFAULT_VARIANTS:
        for label, n, c, _h, _w, co in SHAPES + SMOKE:
            for pro in (False, True):
                cfg = cg.variant(name, co, prologue=pro)
                assert c % cfg.bk == 0 and co % cfg.bn == 0 and cfg.smem_bytes() <= cg.SMEM_LIMIT, (name, label, cfg)
                x, wt, scale, shift = make_inputs(n, c, 8, 8, co, "cpu")
                cg._check(x, wt, scale if pro else None, shift if pro else None, cfg)
                cg.prepare(x, wt, torch.empty((n, co, 8, 8), dtype=torch.float16).contiguous(
                    memory_format=torch.channels_last), scale, shift, pro, cfg, 132)  # fmt: skip
    cfg = resolve(cg.variant, "ws2@stages=3+th=16+persistent=False+silu_impl=tanh16", 256, prologue=True)
    assert (cfg.stages, cfg.th, cfg.persistent, cfg.silu_impl, cfg.bn) == (3, 16, False, "tanh16", 256), cfg
    x, wt, scale, shift = make_inputs(2, 64, 12, 10, 32, "cpu")
    for mode in MODES:
        kw = dict(scale=scale, shift=shift, silu=True) if mode != "plain" else {}
        ref = cg.conv3x3_gluon_ref(x, wt, **kw)
        alt = torch_fp16_path(x.float(), wt.float(), scale, shift, mode)  # fp32 on CPU: the same math
        assert rel_err(alt, ref) < 1e-5, rel_err(alt, ref)
    # padding rule: an off-image pixel contributes 0, not silu(shift)
    one = torch.ones(1, 64, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    wsum = torch.ones(1, 64, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    sc, sh = torch.zeros(1, 64), torch.ones(1, 64)  # act = silu(1) everywhere on the image
    yc = cg.conv3x3_gluon_ref(one, wsum, scale=sc, shift=sh, silu=True)
    s1 = F.silu(torch.tensor(1.0)).item() * 64
    assert abs(yc[0, 0, 1, 1].item() - 9 * s1) < 1e-3 and abs(yc[0, 0, 0, 0].item() - 4 * s1) < 1e-3
    with tempfile.TemporaryDirectory() as d:
        res = Results(os.path.join(d, "r.json"))
        res.add(dict(variant="ws", shape="vae_128_512", mode="plain", ok=True, err=1e-3, torch_fp16_err=1e-3,
                     us=100.0, tflops=500.0, cudnn_us=110.0, speedup_vs_cudnn=1.1))  # fmt: skip
        res.fail("x", "y")
        back = json.load(open(os.path.join(d, "r.json")))
        assert len(back["rows"]) == 1 and back["env"]["card"]
        print(summary(back["rows"]))
    print("cpu selftest OK: variants fit all shapes, inputs/reference/JSON work; env:", environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
