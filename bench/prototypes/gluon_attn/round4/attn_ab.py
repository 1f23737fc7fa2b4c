"""A/B of Gluon d=40 attention kernel files (same signature as attn_fwd_d40_kernel) in one process.
usage: python attn_ab.py OUTDIR name=path [name=path ...]"""
import importlib.util, json, sys, time, statistics
import torch
from speedsd.kernels import attention_gluon as ag
from speedsd.bench.kernels_attention import make_qkv
from speedsd.bench.common import graph_ms, environment

out_dir = sys.argv[1]
mods = {}
for arg in sys.argv[2:]:
    name, path = arg.split("=")
    spec = importlib.util.spec_from_file_location(f"attn_var_{name}", path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[name] = m

PADDED = {}

def run(mod, q, k, v, out, cfg=ag.HOPPER_D40):
    B, H, N, D = q.shape
    if hasattr(mod, "launch"):  # padded layout [B*N, 3*H*64]
        key = (q.data_ptr(), B, H, N)
        if key not in PADDED:
            t = torch.zeros(B, N, 3, H, 64, device=q.device, dtype=q.dtype)
            for i, x in enumerate((q, k, v)):
                t[:, :, i, :, :40] = x.transpose(1, 2)
            PADDED[key] = t.view(B * N, 3 * H * 64)
        mod.launch(PADDED[key], out, N, H, D ** -0.5 * ag.LOG2E)
        return out
    qkv2d = q.as_strided((B * N, 3 * H * D), (3 * H * D, 1))
    mod.attn_fwd_d40_kernel[ag.launch_grid(B, H, N, cfg)](*ag._descriptors(qkv2d, cfg.block_n), out, N, H,
        D ** -0.5 * ag.LOG2E, cfg.stages, cfg.producer_regs, cfg.consumer_regs, num_warps=4)
    return out

res = {"env": environment(), "rows": []}
for (B, H, N) in [(2, 8, 4096), (1, 8, 4096), (2, 8, 640), (2, 8, 16384)]:
    q, k, v = make_qkv(B, H, N, N, 40, fused=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    e_sdpa = (sd.float() - ref).abs().max().item()
    row = {"B": B, "H": H, "N": N, "sdpa_fp16_err": e_sdpa}
    outs = {}
    for name, m in mods.items():
        o = torch.full((B, N, H * 40), float("nan"), device="cuda", dtype=torch.float16)
        run(m, q, k, v, o); torch.cuda.synchronize()
        got = o.unflatten(-1, (H, 40)).transpose(1, 2).float()
        row[f"{name}_err"] = (got - ref).abs().max().item()
        row[f"{name}_nan"] = bool(torch.isnan(o).any().item())
        outs[name] = o
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for bname, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        for d in (40, 64):
            qq, kk, vv = make_qkv(B, H, N, N, d, fused=True)
            try:
                with sdpa_kernel([be]):
                    row[f"sdpa_{bname}_d{d}_us"] = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)) * 1e3
            except Exception as e:
                row[f"sdpa_{bname}_d{d}_us"] = str(e)[:60]
    times = {n: [] for n in mods}
    for rnd in range(3):
        for name in (list(mods) if rnd % 2 == 0 else list(mods)[::-1]):
            o = outs[name]
            times[name].append(graph_ms(lambda m=mods[name], o=o: run(m, q, k, v, o)) * 1e3)
    for n in mods:
        row[f"{n}_us"] = min(times[n]); row[f"{n}_all"] = times[n]
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_all")}), flush=True)
    res["rows"].append(row)
json.dump(res, open(f"{out_dir}/attn_ab.json", "w"), indent=1)
