"""The targets' verdicts from a bench payload (speedsd.bench.targets) and `speedsd bench --targets` on CPU."""

import json

from speedsd.bench import e2e, targets


def _payload(image_pndm=108.7, image_dpm=104.35, unet=5.09, vae=4.29, compile_unet=7.83, compile_vae=7.87,
             eager_vae=23.3, fid=0.86, warm=7.46, peak=2314.0, weights=2034.0):  # fmt: skip
    """Session 22's H200 run (bench/results/e2e.json, e2e_peers.json) by default."""
    return {
        "weight_mib": weights,
        "variants": [
            {"row": "default", "unet_step_ms": unet, "vae_decode_ms": vae, "image_ms": image_pndm},
            {"row": "default, NCHW", "unet_step_ms": 7.58, "vae_decode_ms": 7.74, "image_ms": 157.0},
            {"row": "default, DPM-Solver++ 2M (20 UNet evaluations)", "scheduler": "dpmpp_2m", "image_ms": image_dpm},
        ],
        "peers": [
            {"peer": "diffusers eager (SDPA)", "unet_step_ms": 74.1, "vae_decode_ms": eager_vae},
            {"peer": "diffusers + torch.compile(reduce-overhead), channels-last", "unet_step_ms": compile_unet,
             "vae_decode_ms": compile_vae},
        ],  # fmt: skip
        "fidelity": {"ratio_max_abs": fid},
        "cold_start": {"warm_cache_s": warm, "warm_cache_two_images_peak_mib": peak},
    }


def _met(rows):
    return {r["target"]: r["met"] for r in rows}


def test_verdicts_of_session_22s_run():
    rows = targets.verdicts(_payload())
    assert _met(rows) == {
        "20-step image": False,  # the faster sampler, DPM++ 2M: 104.35 ms
        "UNet step vs torch.compile": False,  # 7.83 / 5.09 = 1.54x
        "VAE decode vs torch.compile": True,  # 1.83x
        "VAE decode vs diffusers eager": True,  # 5.4x
        "fidelity (max abs, ours / diffusers fp16)": True,
        "cold start, warm Triton cache": True,
        "peak memory, two images": True,  # 280 MiB <= 300 MB = 286.1 MiB
    }
    image = next(r for r in rows if r["target"] == "20-step image")
    assert image["measured"] == "108.70 ms PNDM, 104.35 ms DPM++ 2M"
    unet = next(r for r in rows if r["target"] == "UNet step vs torch.compile")
    assert unet["measured"] == "synced 7.83 / 5.09 ms = 1.54x"


def test_verdicts_flip_at_their_thresholds():
    assert _met(targets.verdicts(_payload(image_dpm=99.9)))["20-step image"] is True
    assert _met(targets.verdicts(_payload(image_pndm=100.0, image_dpm=120.0)))["20-step image"] is True
    assert _met(targets.verdicts(_payload(unet=7.83 / 1.8)))["UNet step vs torch.compile"] is True
    assert _met(targets.verdicts(_payload(compile_vae=4.29 * 1.69)))["VAE decode vs torch.compile"] is False
    assert _met(targets.verdicts(_payload(eager_vae=4.29 * 2.9)))["VAE decode vs diffusers eager"] is False
    assert _met(targets.verdicts(_payload(fid=2.01)))["fidelity (max abs, ours / diffusers fp16)"] is False
    assert _met(targets.verdicts(_payload(warm=10.5)))["cold start, warm Triton cache"] is False
    assert _met(targets.verdicts(_payload(peak=2034.0 + 287)))["peak memory, two images"] is False


def _with_b2b(payload, ours=(4.77, 4.38), compile_peer=(6.47, 7.54), eager_vae=22.0):
    """Back-to-back figures (step_timing_h200.json, session 29: ours 4.77 / 4.38 ms, torch.compile 6.47 / 7.54)."""
    default = payload["variants"][0]
    default["unet_step_b2b_ms"], default["vae_decode_b2b_ms"] = ours
    eager, comp = payload["peers"]
    eager["vae_decode_b2b_ms"] = eager_vae
    comp["unet_step_b2b_ms"], comp["vae_decode_b2b_ms"] = compile_peer
    return payload


def test_a_ratio_holds_only_under_both_timings():
    # synced 7.83 / 4.35 = 1.80x would pass alone; back to back 6.47 / 4.77 = 1.36x does not
    rows = targets.verdicts(_with_b2b(_payload(unet=4.35)))
    assert _met(rows)["UNet step vs torch.compile"] is False
    unet = next(r for r in rows if r["target"] == "UNet step vs torch.compile")
    assert unet["measured"] == "synced 7.83 / 4.35 ms = 1.80x; back to back 6.47 / 4.77 ms = 1.36x"
    assert _met(rows)["VAE decode vs torch.compile"] is True  # 1.83x synced, 7.54 / 4.38 = 1.72x back to back
    assert _met(targets.verdicts(_with_b2b(_payload(), ours=(4.77, 4.6))))["VAE decode vs torch.compile"] is False
    both = targets.verdicts(_with_b2b(_payload(unet=4.35), ours=(3.59, 4.38)))  # 6.47 / 3.59 = 1.802x
    assert _met(both)["UNet step vs torch.compile"] is True
    # a side without the back-to-back figure: judged on the timing both sides have
    one_sided = _with_b2b(_payload(unet=4.35))
    del one_sided["peers"][1]["unet_step_b2b_ms"]
    assert _met(targets.verdicts(one_sided))["UNet step vs torch.compile"] is True


def test_missing_numbers_are_not_measured():
    rows = targets.verdicts({"weight_mib": 10.0})
    assert all(r["met"] is None and r["measured"] == "-" for r in rows)
    assert "not measured" in targets.markdown(rows)
    partial = _payload()
    del partial["peers"]
    met = _met(targets.verdicts(partial))
    assert met["UNet step vs torch.compile"] is None and met["20-step image"] is False


def test_bench_targets_mode_on_tiny_model(tmp_path):
    rc = e2e.main(["--model", "random:tiny", "--size", "32", "--steps", "2", "--reps", "2", "--no-peers",
                   "--targets", "--out", str(tmp_path), "--name", "t"])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["ablation"] == []
    rows = {r["row"]: r for r in data["variants"]}
    assert rows["default"]["image_ms"] > 0 and rows["default"]["unet_step_ms"] > 0
    assert any(r.get("scheduler") == "dpmpp_2m" and r["image_ms"] > 0 for r in data["variants"])
    met = _met(data["targets"])
    assert met["20-step image"] is not None and met["UNet step vs torch.compile"] is None  # no peers asked for
    md = (tmp_path / "t.md").read_text()
    assert "## Targets" in md and "## Ablation" not in md and "| 20-step image |" in md
