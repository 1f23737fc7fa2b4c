"""A PNG bar chart of a `speedsd bench` result (20-step image time per configuration), drawn with PIL.

python -m speedsd.bench.chart bench/results/e2e.json        # writes bench/results/e2e.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

W, ROW, LEFT, RIGHT, TOP = 1100, 34, 430, 120, 70
COLORS = {"eager": (120, 144, 176), "graphed": (46, 139, 87)}


def bars(payload: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(label, image ms, kind) per ablation row: eager and, where measured, graphed."""
    out = []
    for r in payload.get("ablation", []):
        if "image_ms" in r:
            kind = "graphed" if r["flags"].get("cuda_graphs") else "eager"
            out.append((r["row"], r["image_ms"], kind))
        if "image_ms" in r.get("graphed", {}):
            out.append((r["row"] + " [graphs]", r["graphed"]["image_ms"], "graphed"))
    return out


def draw(payload: dict[str, Any], path: str | Path) -> Path:
    items = bars(payload)
    if not items:
        raise ValueError("no measured rows to draw")
    h = TOP + ROW * len(items) + 40
    img = Image.new("RGB", (W, h), "white")
    d = ImageDraw.Draw(img)
    env = payload.get("environment", {})
    d.text(
        (10, 10),
        f"speedsd bench: {payload.get('model')}, {payload.get('size')} px square, {payload.get('steps')} steps",
        fill="black",
    )
    d.text(
        (10, 28),
        f"{env.get('card')} | torch {env.get('torch')} | commit {env.get('commit')} | {env.get('date')}",
        fill="black",
    )
    d.text((10, 46), "20-step image, ms (lower is better); grey: eager, green: CUDA graphs", fill="black")
    top = max(v for _, v, _ in items)
    scale = (W - LEFT - RIGHT) / top
    for i, (label, v, kind) in enumerate(items):
        y = TOP + i * ROW
        d.text((10, y + 8), label[:62], fill="black")
        d.rectangle([LEFT, y + 4, LEFT + max(1, int(v * scale)), y + ROW - 6], fill=COLORS[kind])
        d.text((LEFT + int(v * scale) + 6, y + 8), f"{v:.0f}", fill="black")
    out = Path(path)
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m speedsd.bench.chart RESULT.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    print(draw(json.loads(src.read_text()), src.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
