"""Generation parameters in a PNG ``parameters`` tEXt chunk, in the AUTOMATIC1111 web UI format.

    a red fox in the snow
    Negative prompt: blurry
    Steps: 20, Sampler: PNDM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd1.4

The prompt may span several lines; the "Negative prompt:" line is left out when there is none; the
last line is comma-separated ``key: value`` pairs. Tools that read A1111 images (the web UI's
"PNG info" tab, image browsers) show these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Our scheduler names -> the sampler names A1111 writes.
SAMPLER_NAMES: dict[str, str] = {
    "pndm": "PNDM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
NEGATIVE = "Negative prompt: "


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "pndm"  # our scheduler name; written under its A1111 name
    cfg_scale: float = 7.5
    seed: int | None = None
    width: int = 512
    height: int = 512
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # further "key: value" pairs, in order

    def to_text(self) -> str:
        return format_parameters(self)


def _clean(value: object) -> str:
    # commas and newlines would break the one-line "key: value, ..." list
    return str(value).replace("\n", " ").replace(",", " ")


def _num(x: float) -> str:
    return f"{x:g}"


def format_parameters(p: GenerationParams) -> str:
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(NEGATIVE + p.negative_prompt)
    fields: list[tuple[str, object]] = [
        ("Steps", p.steps),
        ("Sampler", SAMPLER_NAMES.get(p.sampler, p.sampler)),
        ("CFG scale", _num(p.cfg_scale)),
    ]
    if p.seed is not None:
        fields.append(("Seed", p.seed))
    fields.append(("Size", f"{p.width}x{p.height}"))
    if p.model:
        fields.append(("Model", p.model))
    fields.extend(p.extra.items())
    lines.append(", ".join(f"{k}: {_clean(v)}" for k, v in fields))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """The inverse of :func:`format_parameters`: {"prompt", "negative_prompt", "Steps", "Sampler", ...}."""
    lines = text.split("\n")
    last = lines.pop() if lines else ""
    out: dict[str, str] = {}
    for item in last.split(", "):
        key, sep, value = item.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_neg = True
            line = line[len(NEGATIVE) :]
        (neg_lines if in_neg else prompt_lines).append(line)
    out["prompt"] = "\n".join(prompt_lines)
    out["negative_prompt"] = "\n".join(neg_lines)
    return out


def png_info(text: str) -> Any:
    """A PIL PngInfo holding ``text`` as the ``parameters`` chunk (iTXt when it is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    try:
        text.encode("latin-1")
        info.add_text("parameters", text)
    except UnicodeEncodeError:
        info.add_itxt("parameters", text)
    return info


def save_png(image: Any, path: str | Path, text: str) -> None:
    """Write ``image`` as a PNG at ``path`` with the ``parameters`` chunk."""
    image.save(path, format="PNG", pnginfo=png_info(text))


def read_parameters(path: str | Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get("parameters")
