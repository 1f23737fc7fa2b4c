"""Where the rows GroupNorm statistics launch spends its time (bench/results/gn_rows_sweep_h200.json: ~8 µs
fixed cost whatever the tensor size). The engine kernel (kernels/group_norm_rows.py, plain mode) against a
copy with each piece switched off or changed:
  TAIL   the last-arriving program merges the P partials (atomic arrival count); off: partials only
  SHIFT  shifted sums around the chunk's first row (one dependent load before the loop); off: K = 0
  UNROLL the row loop unrolled at compile time (every tile's load can issue before the first add)
  GROUPS channel -> group reduction in the program; off: per-channel partials stored
python probe.py OUT.json"""

import functools
import json
import sys

import torch
import triton
import triton.language as tl

from speedsd.bench.common import graph_ms
from speedsd.kernels.device import arrival_counters
from speedsd.kernels.group_norm_kernels import _channels_to_groups_gathered
from speedsd.kernels.group_norm_rows import rows_stats


@triton.jit
def _stats_variant(
    x_ptr, part_ptr, stats_ptr, cnt_ptr, C, S, P, chunk, n_iter,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    CPG_P2: tl.constexpr, N_ITER: tl.constexpr, TAIL: tl.constexpr, SHIFT: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * S * C
    s0 = p * chunk
    if SHIFT:
        k_row = tl.load(x_ptr + off_n + s0 * C + c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        k_row = tl.zeros([BLOCK_C], tl.float32)
    k = k_row[None, :]
    s1 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    if N_ITER > 0:
        for i in tl.static_range(N_ITER):
            s = s0 + i * BLOCK_S + rs
            mask = (s < S)[:, None] & mask_c[None, :]
            x = tl.load(x_ptr + off_n + s[:, None] * C + c[None, :], mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - k, 0.0)
            s1 += d
            s2 += d * d
    else:
        for i in range(0, n_iter):
            s = s0 + i * BLOCK_S + rs
            mask = (s < S)[:, None] & mask_c[None, :]
            x = tl.load(x_ptr + off_n + s[:, None] * C + c[None, :], mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - k, 0.0)
            s1 += d
            s2 += d * d
    m = tl.maximum(tl.minimum(S - s0, chunk), 1) * 1.0
    t1 = tl.sum(s1, axis=0)
    mean_c = k_row + t1 / m
    m2_c = tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / m, 0.0)
    if GROUPS:
        mean_g, m2_g = _channels_to_groups_gathered(mean_c, m2_c, m, C, CPG, CPG_P2, BLOCK_G)
        g = tl.arange(0, BLOCK_G)
        dst = part_ptr + ((n * P + p) * 2) * BLOCK_G + g
        tl.store(dst, mean_g)
        tl.store(dst + BLOCK_G, m2_g)
        if TAIL:
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + n, 1, sem="acq_rel", scope="gpu")
            if done == P - 1:
                q = tl.arange(0, BLOCK_P)
                mask_q = q < P
                n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0
                src = part_ptr + ((n * P + q[:, None]) * 2) * BLOCK_G + g[None, :]
                mean_q = tl.load(src, mask=mask_q[:, None], other=0.0, cache_modifier=".cg")
                m2_q = tl.load(src + BLOCK_G, mask=mask_q[:, None], other=0.0, cache_modifier=".cg")
                mean = tl.sum(n_q[:, None] * mean_q, axis=0) / S
                dev = mean_q - mean[None, :]
                m2 = tl.sum(m2_q + (n_q * CPG)[:, None] * dev * dev, axis=0)
                tl.store(stats_ptr + n * 2 * BLOCK_G + g, mean)
                tl.store(stats_ptr + (n * 2 + 1) * BLOCK_G + g, m2 / (S * CPG * 1.0))
                tl.atomic_xchg(cnt_ptr + n, 0)
    else:
        dst = part_ptr + ((n * P + p) * 2) * BLOCK_C + c
        tl.store(dst, mean_c)
        tl.store(dst + BLOCK_C, m2_c)


def variant(x, groups, chunks, block_s, warps, unroll=True, tail=True, shift=True, grp=True):
    n, c = x.shape[0], x.shape[1]
    s = x[0, 0].numel()
    cpg = c // groups
    block_g = triton.next_power_of_2(groups)
    block_c = triton.next_power_of_2(c)
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s
    p = triton.cdiv(s, chunk)
    part = torch.empty((n, p, 2, max(block_g, block_c)), device=x.device, dtype=torch.float32)
    stats = torch.empty((n, 2, block_g), device=x.device, dtype=torch.float32)
    n_iter = chunk // block_s
    _stats_variant[(p, n)](
        x, part, stats, arrival_counters(x.device, n), c, s, p, chunk, n_iter, CPG=cpg, BLOCK_S=block_s,
        BLOCK_C=block_c, BLOCK_G=block_g, BLOCK_P=triton.next_power_of_2(p), CPG_P2=triton.next_power_of_2(cpg),
        N_ITER=n_iter if unroll else 0, TAIL=tail, SHIFT=shift, GROUPS=grp, num_warps=warps,
    )  # fmt: skip
    return stats


SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (1, 256, 256, 256)]
VARIANTS = {
    "unroll": {},
    "loop": {"unroll": False},
    "unroll notail": {"tail": False},
    "unroll noshift": {"shift": False},
    "unroll nogroups": {"grp": False, "tail": False},
}


def bench_shape(shape: tuple[int, int, int, int]) -> dict:
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(torch.float16).to(memory_format=torch.channels_last)
    ref = x.float().contiguous().view(shape[0], 32, -1)
    ref_mean, ref_var = ref.mean(-1), ref.var(-1, unbiased=False)
    y = torch.empty_like(x)
    row = {"shape": shape, "copy_us": graph_ms(functools.partial(y.copy_, x)) * 1e3, "us": {}, "err": {}}
    bc = triton.next_power_of_2(shape[1])

    def measure(name: str, fn, check: bool) -> None:
        st = fn()
        if check:
            err_m = (st[:, 0, :32] - ref_mean).abs().max().item()
            row["err"][name] = max(err_m, (st[:, 1, :32] - ref_var).abs().max().item())
        row["us"][name] = graph_ms(fn) * 1e3

    for chunks in (64, 128):
        for tile in (4096, 8192):
            bs = max(1, tile // bc)
            for warps in (4, 8):
                key = f"c{chunks} t{tile} w{warps}"
                measure("engine " + key, functools.partial(rows_stats, x, 32, chunks, bs, warps), True)
                for name, kw in VARIANTS.items():
                    if name.startswith("unroll") and chunks < 64 and tile == 4096:
                        continue  # (long unrolled loops: skip the slowest compiles)
                    fn = functools.partial(variant, x, 32, chunks, bs, warps, **kw)
                    measure(name + " " + key, fn, kw.get("tail", True) and kw.get("grp", True))
    best = {}
    for k, v in row["us"].items():
        kind = k.rsplit(" c", 1)[0]
        if kind not in best or v < best[kind][0]:
            best[kind] = (round(v, 2), k)
    row["best"] = best
    row["max_err"] = max(row["err"].values())
    return row


def main() -> None:
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for shape in SHAPES:
        row = bench_shape(shape)
        print(shape, f"copy {row['copy_us']:.2f} err {row['max_err']:.2e}", json.dumps(row["best"]), flush=True)
        out["rows"].append(row)
        json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
