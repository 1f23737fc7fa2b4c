"""The speedsd command line: images + A1111 parameters chunk, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import speedsd
import speedsd.pipeline
from checkpoints import make_diffusers_folder
from speedsd import cli
from speedsd.pngmeta import parse_parameters, read_parameters
from speedsd.tokenizer import Tokenizer

SIZE = "32x32"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_diffusers_folder(tmp_path_factory.mktemp("cli"), kind="sd1"))


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("speedsd: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_generate_writes_pngs_with_parameters(model: str, tmp_path, capsys) -> None:
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox", "--model", model, "--negative", "blurry", "--steps", "3", "--seed", "42"]
    argv += ["--size", "48x32", "--scheduler", "euler_a", "--guidance", "6", "--num-images", "2", "-o", str(out)]
    rc, stdout, err = run_main(capsys, argv + ["--device", "cpu"])  # the CPU pipeline below draws the reference
    assert rc == 0, err
    paths = [out, tmp_path / "fox-1.png"]
    assert stdout.split() == [str(p) for p in paths]
    assert not (tmp_path / "fox-2.png").exists()
    for i, p in enumerate(paths):
        text = read_parameters(p)
        assert text is not None
        lines = text.split("\n")
        assert lines[0] == "a red fox" and lines[1] == "Negative prompt: blurry"
        assert lines[2].startswith("Steps: 3, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 48x32, Model: ")
        fields = parse_parameters(text)
        assert fields["Batch size"] == "2" and fields["Batch pos"] == str(i)
        with Image.open(p) as im:
            assert im.size == (48, 32) and im.mode == "RGB"
    # the same image as the library gives for that seed
    pipe = speedsd.load(model, device="cpu")
    ref = pipe("a red fox", negative_prompt="blurry", steps=3, seed=42, height=32, width=48, scheduler="euler_a",
               guidance_scale=6.0, num_images=2)  # fmt: skip
    for p, im in zip(paths, ref):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(im))


def test_no_seed_records_a_reproducible_one(model: str, tmp_path, capsys) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    rc, _, err = run_main(capsys, ["generate", "owl", "--model", model, "--steps", "2", "--size", SIZE, "-o", str(a)])
    assert rc == 0, err
    fields = parse_parameters(read_parameters(a))
    assert fields["prompt"] == "owl" and fields["negative_prompt"] == "" and "Negative prompt" not in read_parameters(a)
    assert fields["Sampler"] == "PNDM" and fields["Size"] == SIZE  # the model's default scheduler
    seed = fields["Seed"]
    argv = ["generate", "owl", "--model", model, "--steps", "2", "--size", SIZE, "--seed", seed, "-o", str(b)]
    assert run_main(capsys, argv)[0] == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_truncated_prompt_warns_on_one_line(model: str, tmp_path, capsys) -> None:
    """A prompt past 75 tokens is read in blocks by default (no warning, and the image differs from the
    truncated one's); --truncate-prompt reads 75 and warns; past 600 tokens even the blocks warn."""
    prompt, negative = "a red fox " * 30, "blurry " * 80
    tok = Tokenizer.from_dir(Path(model) / "tokenizer")
    n, m = len(tok.encode(prompt)), len(tok.encode(negative))
    assert n > 75 and m > 75
    out = tmp_path / "o.png"
    argv = ["generate", "--model", model, "--steps", "1", "--size", SIZE, "--seed", "3", "-o", str(out)]
    rc, _, err = run_main(capsys, argv + [prompt, "--negative", negative, "--truncate-prompt"])
    assert rc == 0 and out.exists()
    warnings = [line for line in err.splitlines() if line.startswith("speedsd: warning:")]
    reads = "the text encoder reads the first 75, the last"
    assert warnings == [
        f"speedsd: warning: the prompt is {n} tokens; {reads} {n - 75} are ignored",
        f"speedsd: warning: the negative prompt is {m} tokens; {reads} {m - 75} are ignored",
    ]
    fields = parse_parameters(read_parameters(out))
    assert fields["prompt"] == prompt and fields["Truncate prompt"] == "True"  # the PNG keeps it whole
    truncated = np.asarray(Image.open(out))
    rc, _, err = run_main(capsys, argv + [prompt, "--negative", negative])
    assert rc == 0 and "warning" not in err and "Truncate prompt" not in parse_parameters(read_parameters(out))
    assert not np.array_equal(np.asarray(Image.open(out)), truncated)  # the tokens past 75 were read
    rc, _, err = run_main(capsys, argv + ["a red fox"])
    assert rc == 0 and "warning" not in err
    huge = "a red fox " * 210
    k = len(tok.encode(huge))
    assert k > 600
    rc, _, err = run_main(capsys, argv + [huge])
    want = f"speedsd: warning: the prompt is {k} tokens; the text encoder reads the first 600, the last {k - 600} are"
    want += " ignored"
    assert rc == 0 and err.splitlines().count(want) == 1


def test_prompt_weights_flag(model: str, tmp_path, capsys) -> None:
    """--prompt-weights reads (word:1.5) as emphasis (another image than reading the brackets as text) and
    says so in the PNG; a prompt without emphasis draws the same image either way."""
    out = tmp_path / "o.png"
    argv = ["generate", "--model", model, "--steps", "1", "--size", SIZE, "--seed", "3", "-o", str(out)]
    images = {}
    for flags in ([], ["--prompt-weights"]):
        for prompt in ("a red (fox:1.8)", "a red fox"):
            assert run_main(capsys, argv + [prompt] + flags)[0] == 0
            images[prompt, bool(flags)] = np.asarray(Image.open(out))
            assert parse_parameters(read_parameters(out)).get("Prompt weights") == ("True" if flags else None)
    assert not np.array_equal(images["a red (fox:1.8)", True], images["a red (fox:1.8)", False])
    assert np.array_equal(images["a red fox", True], images["a red fox", False])


def _init_image(path, size=(40, 32)) -> str:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def test_img2img_from_init_image(model: str, tmp_path, capsys) -> None:
    init = _init_image(tmp_path / "in.png")
    out = tmp_path / "i2i.png"
    argv = ["generate", "a red fox", "--model", model, "--init-image", init, "--strength", "0.5", "--steps", "4"]
    rc, stdout, err = run_main(capsys, argv + ["--seed", "7", "--device", "cpu", "-o", str(out)])
    assert rc == 0, err
    assert stdout.split() == [str(out)]
    fields = parse_parameters(read_parameters(out))
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "40x32" and fields["Seed"] == "7"
    # the library's img2img with the same image, strength and seed
    pipe = speedsd.load(model, device="cpu")
    with Image.open(init) as im:
        [ref] = pipe.img2img("a red fox", im.convert("RGB"), strength=0.5, steps=4, seed=7)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))
    # --size resizes the init image first
    out2 = tmp_path / "i2i_sized.png"
    rc, _, err = run_main(capsys, argv + ["--size", "48x48", "-o", str(out2)])
    assert rc == 0, err
    with Image.open(out2) as im:
        assert im.size == (48, 48)
    assert parse_parameters(read_parameters(out2))["Size"] == "48x48"


def test_img2img_bad_arguments(model: str, tmp_path, capsys) -> None:
    init = _init_image(tmp_path / "in.png")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    tiny = _init_image(tmp_path / "tiny.png", size=(4, 4))
    out = str(tmp_path / "o.png")
    cases = [
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", init, "--strength", "0"], "--strength must be in (0, 1]"),
        (["--init-image", init, "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--init-image", init, "--strength", "nan"], "--strength must be in (0, 1]"),
        (["--init-image", str(tmp_path / "missing.png")], "does not exist"),
        (["--init-image", str(not_image)], "cannot read --init-image"),
        (["--init-image", tiny], "too small"),
        (["--init-image", init, "--steps", "1", "--strength", "0.5"], "leaves no denoising step"),
    ]
    for extra, needle in cases:
        rc, _, err = run_main(capsys, ["generate", "x", "--model", model, "--steps", "2", "-o", out, *extra])
        assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o.png").exists()


def _hostile_ckpt(path, marker) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)


BAD_ARGS = [
    (["--size", "63x64"], "multiples of 8"),
    (["--size", "big"], "--size must look like"),
    (["--size", "64x"], "--size must look like"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--steps", "two"], "invalid int value"),
    (["--scheduler", "euler_b"], "unknown scheduler 'euler_b'"),
    (["--guidance", "-2"], "guidance_scale must be"),
    (["--num-images", "0"], "num_images must be"),
    (["--seed", "-5"], "seed must be"),
    (["--flags", "turbo"], "unknown --flags preset 'turbo'"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--device", "tpu9"], "unknown device"),
    (["-o", "out.jpg"], "must be a .png file"),
    (["-o", "/nonexistent-dir/x.png"], "does not exist"),
]


@pytest.mark.parametrize("extra,needle", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_one_line(model: str, tmp_path, capsys, extra: list[str], needle: str) -> None:
    argv = ["generate", "x", "--model", model, "--steps", "2", "--size", SIZE, "-o", str(tmp_path / "o.png"), *extra]
    rc, out, err = run_main(capsys, argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(model: str, tmp_path, capsys) -> None:
    rc, _, err = run_main(
        capsys, ["generate", "x", "--model", model, "--device", "cuda", "-o", str(tmp_path / "o.png")]
    )
    assert_one_line_error(rc, err, "CUDA is not available")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"speedsd {speedsd.__version__}\n"


def test_missing_model_argument(capsys) -> None:
    rc, _, err = run_main(capsys, ["generate", "x"])
    assert_one_line_error(rc, err, "--model")


def test_checkpoint_problems(tmp_path, capsys) -> None:
    out = str(tmp_path / "o.png")
    rc, _, err = run_main(capsys, ["generate", "x", "--model", str(tmp_path / "nope.safetensors"), "-o", out])
    assert_one_line_error(rc, err, "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    rc, _, err = run_main(capsys, ["generate", "x", "--model", str(corrupt), "-o", out])
    assert_one_line_error(rc, err, "corrupt.safetensors")
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    _hostile_ckpt(hostile, marker)
    rc, _, err = run_main(capsys, ["generate", "x", "--model", str(hostile), "-o", out])
    assert_one_line_error(rc, err, "hostile.ckpt")
    assert not marker.exists()  # the pickle's payload never ran
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    rc, _, err = run_main(capsys, ["generate", "x", "--model", str(empty), "-o", out])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(model: str, tmp_path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run_main(capsys, ["generate", "x", "--model", model, "--size", SIZE, "-o", str(ro / "o.png")])
    finally:
        ro.chmod(0o700)
    assert_one_line_error(rc, err, "not writable")


def test_output_is_a_folder(model: str, tmp_path, capsys) -> None:
    (tmp_path / "o.png").mkdir()
    rc, _, err = run_main(capsys, ["generate", "x", "--model", model, "--size", SIZE, "-o", str(tmp_path / "o.png")])
    assert_one_line_error(rc, err, "is a folder")


def test_write_failure_after_generation(model: str, tmp_path, capsys, monkeypatch) -> None:
    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("speedsd.pngmeta.save_png", fail)
    argv = ["generate", "x", "--model", model, "--steps", "1", "--size", SIZE, "-o", str(tmp_path / "o.png")]
    rc, _, err = run_main(capsys, argv)
    assert_one_line_error(rc, err, "No space left on device")


def test_genuine_bug_still_tracebacks(model: str, tmp_path, monkeypatch) -> None:
    def bug(self, *a, **k):
        raise RuntimeError("shape mismatch deep inside")

    monkeypatch.setattr(speedsd.pipeline.Pipeline, "__call__", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["generate", "x", "--model", model, "--size", SIZE, "-o", str(tmp_path / "o.png")])


def test_bench_dispatches_lazily(monkeypatch) -> None:
    seen = []
    fake = types.ModuleType("speedsd.bench.e2e")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "speedsd.bench.e2e", fake)
    assert cli.main(["bench", "--model", "random:sd1.4", "--steps", "2"]) == 7
    assert seen == [["--model", "random:sd1.4", "--steps", "2"]]


def test_serve_bad_port(model: str, capsys) -> None:
    rc, _, err = run_main(capsys, ["serve", "--model", model, "--port", "70000"])
    assert_one_line_error(rc, err, "--port")


def test_subprocess_module_entry(model: str, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "s.png"
    ok = subprocess.run(
        [sys.executable, "-m", "speedsd", "generate", "x", "--model", model, "--steps", "1", "--size", SIZE,
         "--seed", "1", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and "Seed: 1" in read_parameters(out)
    bad = subprocess.run(
        [sys.executable, "-m", "speedsd", "generate", "x", "--model", model, "--size", "63x64"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["speedsd: error: --size must be positive multiples of 8, got '63x64'"]
