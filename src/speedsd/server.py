"""A small HTTP API over one pipeline, standard library only.

    speedsd serve --model path/to/model --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "a red fox", "seed": 42}' -o fox.png

POST /generate takes a JSON object {prompt, negative_prompt, steps, guidance_scale, width, height,
seed, scheduler, init_image, strength, truncate_prompt, prompt_weights} (all but prompt optional) and
answers image/png with the A1111 ``parameters`` chunk (and the seed in an ``X-Seed`` header; an
``X-Warning`` header says when the text encoder did not read a prompt whole: past 600 tokens, or past 75
with ``truncate_prompt``, which reads the first 75 only, as diffusers does; by default longer prompts are
read in blocks of 75, as AUTOMATIC1111 does). ``prompt_weights`` reads AUTOMATIC1111's emphasis,
(word) / [word] / (word:1.3) (speedsd.prompts). ``init_image`` (a base64-encoded PNG/JPEG/...)
makes it img2img: that image (resized to width x height when they are given) is repainted over
``strength`` (0, 1], default 0.8, of the schedule. GET /health answers JSON. A malformed request gets
400 and a one-line JSON ``{"error": "..."}``. Requests are served on threads, but generations run
one at a time (one pipeline, one lock).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 32 << 20  # bytes (a base64 init image of 2048² fits)
FIELDS = {
    "prompt": str,
    "negative_prompt": str,
    "steps": int,
    "guidance_scale": (int, float),
    "width": int,
    "height": int,
    "seed": int,
    "scheduler": str,
    "init_image": str,
    "strength": (int, float),
    "truncate_prompt": bool,
    "prompt_weights": bool,
}


class RequestError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SpeedSDServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], pipe: Any, max_size: int = 2048, quiet: bool = False) -> None:
        super().__init__(address, Handler)
        self.pipe = pipe
        self.max_size = max_size
        self.quiet = quiet
        self.lock = threading.Lock()

    def generate(self, body: dict[str, Any]) -> tuple[bytes, int, list[str]]:
        """Validate a /generate request and run it; returns (PNG bytes, seed, warnings: a truncated prompt,
        prompts.truncation_warnings). Raises ValueError."""
        from speedsd import inputs as pl
        from speedsd import prompts
        from speedsd.pngmeta import GenerationParams, png_info

        req = parse_request(body)
        pipe = self.pipe
        # an init image may be larger than max_size (it is resized to width x height), up to 4x a side
        init = decode_image(req["init_image"], 4 * self.max_size) if "init_image" in req else None
        if init is None and "strength" in req:
            raise ValueError("strength needs init_image")
        width = req.get("width", pipe.default_size if init is None else init.width)
        height = req.get("height", pipe.default_size if init is None else init.height)
        if init is None or "width" in req or "height" in req:
            pl.check_size(height, width)
        elif min(width, height) < 8:  # its own size: the pipeline cuts it to multiples of 8
            raise ValueError(f"init_image must be at least 8x8, got {width}x{height}")
        if max(width, height) > self.max_size:
            raise ValueError(f"width and height must be <= {self.max_size}, got {width}x{height}")
        seed = req.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32)
        pl.check_seed(seed)
        scheduler = req.get("scheduler") or pipe.components.default_scheduler
        kwargs = dict(
            negative_prompt=req.get("negative_prompt") or None,
            steps=req.get("steps", 20),
            guidance_scale=float(req.get("guidance_scale", 7.5)),
            seed=seed,
            scheduler=scheduler,
            truncate_prompt=req.get("truncate_prompt", False),
            prompt_weights=req.get("prompt_weights", False),
        )
        pl.check_common(kwargs["steps"], kwargs["guidance_scale"], 1, scheduler, "pil")
        extra = {}
        if init is not None:
            strength = float(req.get("strength", 0.8))
            pl.check_strength(kwargs["steps"], strength)
            init = pl.fit_image(init, (width, height))
            extra["Denoising strength"] = strength
        extra.update(prompts.png_extras(kwargs["truncate_prompt"], kwargs["prompt_weights"]))
        with self.lock:
            if init is None:
                [image] = pipe(req["prompt"], height=height, width=width, **kwargs)
            else:
                [image] = pipe.img2img(req["prompt"], init, strength=strength, **kwargs)
        params = GenerationParams(
            prompt=req["prompt"],
            negative_prompt=req.get("negative_prompt", ""),
            steps=kwargs["steps"],
            sampler=scheduler,
            cfg_scale=kwargs["guidance_scale"],
            seed=seed,
            width=image.width,
            height=image.height,
            model=pipe.name,
            extra=extra,
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=png_info(params.to_text()))
        how = kwargs["negative_prompt"], kwargs["truncate_prompt"], kwargs["prompt_weights"]
        return buf.getvalue(), seed, prompts.truncation_warnings(pipe.tokenizer, req["prompt"], *how)


def decode_image(text: str, max_side: int) -> Any:
    """A base64-encoded image file of sides <= max_side -> RGB PIL image (ValueError with one line for anything
    else; the size is checked from the header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("init_image must be a base64-encoded image file") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if max(im.size) > max_side:
                raise ValueError(f"init_image is {im.width}x{im.height}, larger than {max_side} on a side")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"init_image is not a readable image ({type(e).__name__})") from None


def parse_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    if "prompt" not in body:
        raise ValueError("missing field: prompt")
    out = {}
    for key, value in body.items():
        if value is None and key != "prompt":
            continue
        kind = FIELDS[key]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            want = {str: "a string", int: "an integer", bool: "true or false"}.get(kind, "a number")  # type: ignore[call-overload]
            raise ValueError(f"field {key!r} must be {want}, got {json.dumps(value)[:40]}")
        out[key] = value
    return out


class Handler(BaseHTTPRequestHandler):
    server: SpeedSDServer
    server_version = "speedsd"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, (json.dumps(obj) + "\n").encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": " ".join(message.split())})

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(404, f"no such endpoint: GET {self.path}")
        pipe = self.server.pipe
        self._json(
            200,
            {
                "status": "ok",
                "model": pipe.name,
                "device": str(pipe.device),
                "dtype": str(pipe.dtype).removeprefix("torch."),
                "default_size": pipe.default_size,
                "default_scheduler": pipe.components.default_scheduler,
                "busy": self.server.lock.locked(),
            },
        )

    def do_POST(self) -> None:
        if self.path != "/generate":
            return self._error(404, f"no such endpoint: POST {self.path}")
        try:
            body = self._read_json()
            png, seed, warnings = self.server.generate(body)
        except RequestError as e:
            return self._error(e.status, str(e))
        except ValueError as e:
            return self._error(400, str(e))
        except Exception:  # a bug: keep serving, say so, log the traceback
            traceback.print_exc(file=sys.stderr)
            return self._error(500, "internal error (see the server log)")
        headers = {"X-Seed": str(seed)} | ({"X-Warning": "; ".join(warnings)} if warnings else {})
        self._send(200, png, "image/png", headers)

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"invalid JSON: {e}") from None


def make_server(pipe: Any, host: str = "127.0.0.1", port: int = 8000, max_size: int = 2048, quiet: bool = False):
    """Bind (port 0: any free port; see ``server.server_address``) without serving yet."""
    return SpeedSDServer((host, port), pipe, max_size=max_size, quiet=quiet)


def serve(pipe: Any, host: str = "127.0.0.1", port: int = 8000, max_size: int = 2048) -> None:
    server = make_server(pipe, host, port, max_size)
    h, p = server.server_address[:2]
    print(f"speedsd: serving {pipe.name} on http://{h}:{p} (POST /generate, GET /health)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
