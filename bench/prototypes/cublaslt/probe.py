"""Probe: every GEMM of one SD-1.4 UNet step (512², CFG batch 2, default flags) timed as torch calls it against
each algorithm cuBLASLt's heuristic offers for the same problem (fp16, CUDA graphs, weights cycled out of L2).

    python probe.py OUT.json

1. Records the step's aten.mm / aten.addmm calls (shapes, strides, bias, beta) under a dispatch mode.
2. Per unique problem: torch's call (the engine's choice today) and every heuristic algorithm through cuBLASLt
   (bench/prototypes/cublaslt/lt.py), each checked against torch's output on a NaN-poisoned output buffer.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import lt  # noqa: E402

from speedsd.bench import common  # noqa: E402

aten = torch.ops.aten


class Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func).split(".")[1]
        if name == "linear":  # (under inference_mode the composite op arrives whole)
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            k = x.shape[-1]
            flat = x.is_contiguous() or x.reshape(-1, k).data_ptr() == x.data_ptr() and x.stride(-1) == 1
            key = ("linear", (x.numel() // k, k), (k, 1) if flat else tuple(x.stride()), (k, w.shape[0]),
                   tuple(w.t().stride()), None if b is None else "vec", 0.0 if b is None else 1.0, str(x.dtype))  # fmt: skip
            self.calls[key] += 1
        elif name == "addmm_" and not kwargs:  # r.addmm_(x, W.t()): r += x @ Wᵀ
            r, x, wt = args[0], args[1], args[2]
            key = ("linear", tuple(x.shape), tuple(x.stride()), tuple(wt.shape), tuple(wt.stride()), "mat", 1.0,
                   str(x.dtype))  # fmt: skip
            self.calls[key] += 1
        elif name in ("mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm"):
            self.calls[(str(func), *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)),
                        str(kwargs))] += 1  # fmt: skip
        return func(*args, **kwargs)


def record_step(model: str = "random:sd1.4", latent: int = 64, **load_kw) -> Counter:
    import speedsd

    pipe = speedsd.load(model, **load_kw)
    x = torch.randn(2, 4, latent, latent, device=pipe.device)
    t = torch.tensor(500, device=pipe.device)
    emb = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    with torch.inference_mode():
        pipe.unet_step(x, t, emb, eager=True)  # compile/warm everything outside the mode
        rec = Record()
        with rec:
            pipe.unet_step(x, t, emb, eager=True)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec.calls


def main(out_json: str) -> None:
    calls = record_step()
    rows = []
    for key, count in sorted(calls.items(), key=lambda kv: -kv[1]):
        if key[0] != "linear":
            rows.append({"other": str(key), "calls": count, "skipped": "not a linear"})
            print(rows[-1], flush=True)
            continue
        func, ashape, astride, bshape, bstride, bias, beta, dt = key
        m, k = ashape
        n = bshape[1]
        row = {"func": func, "m": m, "n": n, "k": k, "a_stride": astride, "b_stride": bstride, "bias": bias,
               "beta": beta, "calls": count}  # fmt: skip
        rows.append(row)
        # only the row-major X @ W^T form (b = W.t() of a contiguous [N, K] weight, a contiguous [M, K])
        if astride != (k, 1) or bstride != (1, k) or bias == "mat" and beta not in (0.0, 1.0):
            row["skipped"] = "layout"
            print(row, flush=True)
            continue
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        x = torch.randn(m, k, device="cuda", generator=g).add_(0.5).half()
        w0 = torch.randn(n, k, device="cuda", generator=g).div_(k**0.5).half()
        copies = common.copies_out_of_l2(w0.numel() * 2)
        ws = [w0 + 1e-3 * i for i in range(copies)]
        bvec = torch.randn(n, device="cuda", generator=g).half() if bias == "vec" else None
        c0 = torch.randn(m, n, device="cuda", generator=g).half() if bias == "mat" else None
        cmat = None if c0 is None else c0.clone()
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)

        def torch_call(w):  # noqa: ANN001, ANN202
            if bias == "vec":
                return torch.addmm(bvec, x, w.t())
            if bias == "mat":
                return cmat.addmm_(x, w.t())  # the engine's in-place residual accumulate
            return torch.mm(x, w.t())

        ref = torch_call(ws[0]).float()
        row["torch_us"] = 1e3 * common.cycled_graph_ms(torch_call, ws, reps=7)
        gemm = lt.Gemm(m, n, k, torch.float16, bias == "vec", beta if bias == "mat" else 0.0)
        algos = []
        for i, h in enumerate(gemm.heuristics(32)):
            desc = lt.describe(h.algo)
            entry = {"rank": i, "waves": round(h.waves, 3), "workspace": int(h.workspace), **desc}
            try:
                if c0 is None:
                    out.fill_(float("nan"))
                else:
                    out.copy_(c0)
                gemm.run(h.algo, x, ws[0], out, bvec, None)
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                entry["max_err_vs_torch"] = err
                if not err <= 2e-2 * max(1.0, ref.abs().max().item()):
                    entry["bad"] = True
                    algos.append(entry)
                    continue
                entry["us"] = 1e3 * common.cycled_graph_ms(
                    lambda w, h=h: gemm.run(h.algo, x, w, out, bvec, None), ws, reps=7)
            except RuntimeError as e:
                entry["error"] = str(e)[:200]
            algos.append(entry)
        row["algos"] = algos
        timed = [a for a in algos if "us" in a]
        if timed:
            best = min(timed, key=lambda a: a["us"])
            row["best_us"], row["best_rank"] = best["us"], best["rank"]
            row["gain_us_per_step"] = (row["torch_us"] - best["us"]) * count
        print({k: v for k, v in row.items() if k != "algos"}, flush=True)
        del ws, x, out
        torch.cuda.empty_cache()
    total = sum(r.get("gain_us_per_step", 0.0) for r in rows if r.get("gain_us_per_step", 0) > 0)
    torch_total = sum(r.get("torch_us", 0.0) * r["calls"] for r in rows)
    print(f"torch GEMM time a step {torch_total:.1f} us; best-algo gain {total:.1f} us a step", flush=True)
    with open(out_json, "w") as f:
        json.dump({"env": common.environment(), "torch_us_per_step": torch_total, "gain_us_per_step": total,
                   "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
