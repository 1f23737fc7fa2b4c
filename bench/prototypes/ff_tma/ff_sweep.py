"""The three FF GEGLU TMA sweeps of session 16 (bench/results/ff_tma_sweep_h200.json, runs 1-3), one script:

    python ff_sweep.py OUTDIR SECONDS --run 1   # two-accumulator kernel (ff_tma.py): tiles x warps x stages x persistent x WS
    python ff_sweep.py OUTDIR SECONDS --run 2   # two-accumulator kernel, non-persistent, wider tile grid
    python ff_sweep.py OUTDIR SECONDS --run 3   # one 3-D W box, one wide wgmma (ff_tma3.py; what landed) + run 2's best as refs

CUDA-graph replay (speedsd.bench.common.graph_ms); ok = max abs error vs fp32 torch <= 2x torch fp16's."""
import argparse, importlib, itertools, json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ff_tma import ff_geglu_tma
from ff_tma3 import ff3
from speedsd.bench.common import graph_ms, environment

gg = importlib.import_module("speedsd.kernels.geglu")
SHAPES = [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120)]
RUNS = {  # shapes, (BM, BN, BK, warps, stages, persistent, ws) grid, kernel, extra filter
    1: (SHAPES, ((64, 128), (64, 128), (64,), (4, 8), (3, 4), (False, True), (False, True)), "tma"),
    2: (SHAPES[:2], ((128, 256), (64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5), (False,), (False,)), "tma"),
    3: (SHAPES, ((64, 128, 256), (32, 64, 128), (32, 64), (4, 8), (2, 3, 4), (False,), (False,)), "ff3"),
}


def skip(run, M, BM, BN, BK, warps, stages):
    if run == 1:
        return BM == 64 and M > 2048
    too_big = BM * BN * 2 // (32 * warps) > 128 or (BM + 2 * BN) * BK * 2 * stages > 220 * 1024
    return too_big or (run == 3 and BM == 64 and warps == 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out"); ap.add_argument("seconds", type=float); ap.add_argument("--run", type=int, default=3)
    a = ap.parse_args()
    shapes, grid, kind = RUNS[a.run]
    res = {"env": environment(), "rows": []}
    t_end = time.time() + a.seconds
    for M, K, Fd in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g) * 2 + 0.5
        w = torch.randn(2 * Fd, K, device="cuda", dtype=torch.float16, generator=g) * K ** -0.5
        b = torch.randn(2 * Fd, device="cuda", dtype=torch.float16, generator=g) * 0.1
        ref = gg.feed_forward_geglu_ref(x.float(), w.float(), b.float())
        e16 = (gg.feed_forward_geglu_ref(x, w, b).float() - ref).abs().max().item()
        row = {"M": M, "K": K, "F": Fd, "torch_fp16_err": e16}
        row["engine_us"] = graph_ms(lambda: gg.feed_forward_geglu(x, w, b)) * 1e3
        row["cublas_gemm_only_us"] = graph_ms(lambda: F.linear(x, w, b)) * 1e3
        cands = []

        def add(name, fn):
            o = torch.full((M, Fd), float("nan"), device="cuda", dtype=torch.float16)
            try:
                fn(o); torch.cuda.synchronize()
                err = (o.float() - ref).abs().max().item()
                cands.append({"name": name, "us": graph_ms(lambda: fn(o)) * 1e3, "err": err, "ok": bool(err <= 2 * e16 + 1e-6)})
            except Exception as e:
                cands.append({"name": name, "error": str(e)[:120]})

        if a.run == 3:
            for warps in (4, 8):
                add(f"tma_ref_128x64x64_w{warps}_s3", lambda o, warps=warps: ff_geglu_tma(
                    x, w, b, o, BM=128, BN=64, BK=64, stages=3, num_warps=warps, persistent=False))
        for BM, BN, BK, warps, stages, pers, ws in itertools.product(*grid):
            if time.time() > t_end or skip(a.run, M, BM, BN, BK, warps, stages):
                continue
            name = f"{kind}_{BM}x{BN}x{BK}_w{warps}_s{stages}{'_pers' if pers else ''}{'_ws' if ws else ''}"
            if kind == "ff3":
                add(name, lambda o, c=(BM, BN, BK, stages, warps): ff3(x, w, b, o, BM=c[0], BN=c[1], BK=c[2], stages=c[3], num_warps=c[4]))
            else:
                add(name, lambda o, c=(BM, BN, BK, stages, warps, pers, ws): ff_geglu_tma(
                    x, w, b, o, BM=c[0], BN=c[1], BK=c[2], stages=c[3], num_warps=c[4], persistent=c[5], ws=c[6]))
        ok = sorted([c for c in cands if c.get("ok")], key=lambda c: c["us"])
        row.update(best=ok[:6], n_ok=len(ok), n_fail=len([c for c in cands if "error" in c]),
                   n_wrong=len([c for c in cands if c.get("ok") is False]), errors=[c for c in cands if "error" in c][:3], all=cands)
        print(json.dumps({k: v for k, v in row.items() if k != "all"})[:1500], flush=True)
        res["rows"].append(row)
        json.dump(res, open(f"{a.out}/ff_sweep{a.run}.json", "w"), indent=1)


if __name__ == "__main__":
    main()
