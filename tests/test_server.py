"""The HTTP API on a loopback port with a tiny model."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import speedsd
from checkpoints import make_diffusers_folder
from speedsd.pngmeta import parse_parameters
from speedsd.server import make_server

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = speedsd.load(str(make_diffusers_folder(tmp_path_factory.mktemp("srv"), kind="sd1")), device="cpu")
    srv = make_server(pipe, "127.0.0.1", 0, max_size=256, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, path: str) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}{path}"


def post(srv, body: bytes | dict, path: str = "/generate") -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url(srv, path), data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


REQ = {"prompt": "a red fox", "negative_prompt": "blurry", "steps": 2, "width": 32, "height": 32, "scheduler": "ddim"}


def test_health(server) -> None:
    with urllib.request.urlopen(url(server, "/health"), timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        body = json.loads(r.read())
    assert body["status"] == "ok" and body["device"] == "cpu" and body["default_scheduler"] == "pndm"


def test_generate_png_with_parameters(server) -> None:
    status, headers, png = post(server, {**REQ, "seed": 5, "guidance_scale": 6})
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Seed"] == "5"
    im = Image.open(io.BytesIO(png))
    assert im.size == (32, 32)
    fields = parse_parameters(im.info["parameters"])
    assert fields["prompt"] == "a red fox" and fields["negative_prompt"] == "blurry"
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"]) == ("2", "DDIM", "6", "5")
    ref = server.pipe("a red fox", negative_prompt="blurry", steps=2, guidance_scale=6.0, height=32, width=32,
                      seed=5, scheduler="ddim")[0]  # fmt: skip
    assert np.array_equal(np.asarray(im), np.asarray(ref))


def test_random_seed_reported(server) -> None:
    status, headers, png = post(server, {"prompt": "owl", "steps": 1, "width": 32, "height": 32})
    assert status == 200
    seed = int(headers["X-Seed"])
    assert parse_parameters(Image.open(io.BytesIO(png)).info["parameters"])["Seed"] == str(seed)
    again = post(server, {"prompt": "owl", "steps": 1, "width": 32, "height": 32, "seed": seed})[2]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(io.BytesIO(again))))


def test_truncated_prompt_warning_header(server) -> None:
    """truncate_prompt: the first 75 tokens and an X-Warning; by default a long prompt is read in blocks."""
    prompt = "a red fox " * 30
    n = len(server.pipe.tokenizer.encode(prompt))
    req = {**REQ, "prompt": prompt, "negative_prompt": "", "steps": 1}
    status, headers, png = post(server, {**req, "truncate_prompt": True})
    assert status == 200 and n > 75
    want = f"the prompt is {n} tokens; the text encoder reads the first 75, the last {n - 75} are ignored"
    assert headers["X-Warning"] == want
    assert parse_parameters(Image.open(io.BytesIO(png)).info["parameters"])["Truncate prompt"] == "True"
    status, headers, whole = post(server, req)  # (tests/test_pipeline.py checks what the blocks feed the UNet)
    assert status == 200 and "X-Warning" not in headers
    assert "Truncate prompt" not in parse_parameters(Image.open(io.BytesIO(whole)).info["parameters"])
    status, headers, _ = post(server, {**REQ, "steps": 1})
    assert status == 200 and "X-Warning" not in headers
    status, _, body = post(server, {**req, "truncate_prompt": 1})
    assert status == 400 and "'truncate_prompt' must be true or false" in json.loads(body)["error"]


def test_prompt_weights_field(server) -> None:
    req = {**REQ, "prompt": "a (red:1.5) fox", "steps": 1, "prompt_weights": True}
    status, headers, png = post(server, req)
    assert status == 200 and "X-Warning" not in headers
    assert parse_parameters(Image.open(io.BytesIO(png)).info["parameters"])["Prompt weights"] == "True"
    status, _, body = post(server, {**req, "prompt_weights": "yes"})
    assert status == 400 and "'prompt_weights' must be true or false" in json.loads(body)["error"]


def _b64_image(size=(40, 32), fmt="PNG") -> str:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img(server) -> None:
    init = _b64_image()
    body = {"prompt": "a red fox", "steps": 4, "strength": 0.5, "seed": 9, "init_image": init}
    status, headers, png = post(server, body)
    assert status == 200, png
    im = Image.open(io.BytesIO(png))
    assert im.size == (40, 32)  # the init image's own size
    fields = parse_parameters(im.info["parameters"])
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "40x32" and fields["Seed"] == "9"
    source = Image.open(io.BytesIO(base64.b64decode(init))).convert("RGB")
    ref = server.pipe.img2img("a red fox", source, strength=0.5, steps=4, seed=9)[0]
    assert np.array_equal(np.asarray(im), np.asarray(ref))
    # width/height resize the init image first (a JPEG here)
    status, _, png = post(server, {**body, "init_image": _b64_image(fmt="JPEG"), "width": 48, "height": 48})
    assert status == 200 and Image.open(io.BytesIO(png)).size == (48, 48)


I2I = {"prompt": "x", "steps": 2, "init_image": _b64_image()}
BAD_I2I = [
    ({**REQ, "strength": 0.5}, "strength needs init_image"),
    ({**I2I, "strength": 0}, "strength must be in (0, 1]"),
    ({**I2I, "strength": 2}, "strength must be in (0, 1]"),
    ({**I2I, "strength": "high"}, "field 'strength' must be a number"),
    ({**I2I, "steps": 1, "strength": 0.5}, "leaves no denoising step"),
    ({**I2I, "init_image": "not base64!"}, "base64-encoded image"),
    ({**I2I, "init_image": base64.b64encode(b"plain text").decode()}, "not a readable image"),
    ({**I2I, "init_image": _b64_image((1100, 8))}, "larger than 1024 on a side"),
    ({**I2I, "init_image": _b64_image((4, 4))}, "at least 8x8"),
    ({**I2I, "width": 36}, "width must be a positive multiple of 8"),
    ({**I2I, "width": 512}, "must be <= 256"),
]


@pytest.mark.parametrize("body,needle", BAD_I2I, ids=[n for _, n in BAD_I2I])
def test_bad_img2img_requests_are_400(server, body, needle: str) -> None:
    status, headers, raw = post(server, body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert raw.decode().count("\n") == 1 and needle in json.loads(raw)["error"]


BAD = [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"steps": 2}, "missing field: prompt"),
    ({**REQ, "colour": "red"}, "unknown field(s): colour"),
    ({**REQ, "steps": 0}, "steps must be an integer >= 1"),
    ({**REQ, "steps": "3"}, "field 'steps' must be an integer"),
    ({**REQ, "width": 33}, "width must be a positive multiple of 8"),
    ({**REQ, "width": 1024}, "must be <= 256"),
    ({**REQ, "scheduler": "nope"}, "unknown scheduler 'nope'"),
    ({**REQ, "guidance_scale": True}, "must be a number"),
    ({**REQ, "seed": -3}, "seed must be"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_requests_are_400(server, body, needle: str) -> None:
    status, headers, raw = post(server, body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    text = raw.decode()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line
    assert needle in json.loads(text)["error"]


def test_unknown_paths(server) -> None:
    assert post(server, REQ, "/txt2img")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url(server, "/nope"), timeout=30)
    assert e.value.code == 404


def test_concurrent_requests_one_at_a_time(server, monkeypatch) -> None:
    active, peak = [0], [0]
    lock = threading.Lock()
    orig = server.pipe.unet_step

    def step(*a):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return orig(*a)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(server.pipe, "unet_step", step)
    results = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(post(server, {**REQ, "seed": s})[0])) for s in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [200, 200, 200]
    assert peak[0] == 1
