"""The README's demo picture: the demo brief's mood board (top) and the finals `make demo` delivered (bottom).

    .venv/bin/python docs/demo_picture.py [--home .atelier] [--out docs/demo.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FINALS = ("hero-1", "hero-2", "square-1", "story-1", "story-2")


def row(images: list[Image.Image], height: int, gap: int) -> Image.Image:
    scaled = [im.convert("RGB").resize((round(im.width * height / im.height), height), Image.Resampling.LANCZOS)
              for im in images]
    out = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=ROOT / ".atelier")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.jpg")
    a = p.parse_args()
    board = [Image.open(f) for f in sorted((ROOT / "campaigns" / "micro" / "moodboard").glob("*.png"))]
    finals = [Image.open(a.home / "outputs" / "sunny-lemonade" / f"{name}.png") for name in FINALS]
    top, bottom = row(board, 110, 6), row(finals, 180, 6)
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + 6 + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + 6))
    out.save(a.out, quality=85)
    print(f"{a.out}: {out.width}x{out.height}")


if __name__ == "__main__":
    main()
