"""Render micro-world scenes with numpy + PIL: ~thousands of 64x64 images per second on one core.

Geometry is relative: the object's centre is a fraction of width and height (``scene.ANCHORS``), its
radius a fraction of the short side (``scene.RADIUS``), the pattern period 1/8 of the short side, so
any size and aspect ratio renders the same scene. A seed adds small jitter (position, size, pattern
phase); the same (scene, size, seed) always gives the same pixels.

Styles: ``flat`` (solid background and object), ``striped`` (diagonal background stripes of the
background's shade, ``scene.shade``), ``dotted`` (a grid of shade dots), ``outlined`` (solid background,
the object drawn as a thick outline).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from atelier.world.scene import ANCHORS, COLOURS, RADIUS, Scene, shade


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


_T = 0.34  # half thickness of the cross' arms
# Unit outlines in [-1, 1]^2, y down. The circle is drawn as an ellipse.
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "cross": [(-_T, -1), (_T, -1), (_T, -_T), (1, -_T), (1, _T), (_T, _T), (_T, 1), (-_T, 1), (-_T, _T), (-1, _T),
              (-1, -_T), (-_T, -_T)],
    "house": [(-0.75, 0.9), (-0.75, -0.1), (-0.98, -0.1), (0.0, -1.0), (0.98, -0.1), (0.75, -0.1), (0.75, 0.9)],
}


def shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float, outlined: bool,
               line: int | None = None) -> np.ndarray:
    """Boolean (H, W) mask of a shape centred at pixel (cx, cy) with radius r pixels."""
    im = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(im)
    line = line or max(2, int(round(r * 0.18)))
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if outlined:
            d.ellipse(box, outline=255, width=line)
        else:
            d.ellipse(box, fill=255)
    else:
        pts = [(cx + x * r, cy + y * r) for x, y in POLYGONS[shape]]
        if outlined:
            d.line(pts + [pts[0], pts[1]], fill=255, width=line, joint="curve")
        else:
            d.polygon(pts, fill=255)
    return np.asarray(im) > 127


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))


def pattern_mask(style: str, width: int, height: int, phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Boolean (H, W) mask of the background pattern (shade pixels) for a style."""
    period = max(4.0, min(width, height) / 8)
    xx, yy = _grid(width, height)
    if style == "striped":
        return ((xx + yy + phase[0] * period) % period) < period * 0.35
    if style == "dotted":
        dx = (xx + phase[0] * period) % period - period / 2
        dy = (yy + phase[1] * period) % period - period / 2
        return dx * dx + dy * dy < (period * 0.24) ** 2
    return np.zeros((height, width), dtype=bool)


def layout(scene: Scene, width: int, height: int, seed: int = 0) -> tuple[float, float, float, tuple[float, float]]:
    """(cx, cy, r, pattern phase) in pixels for a scene, with the seed's jitter."""
    rng = np.random.default_rng(seed)
    ax, ay = ANCHORS[scene.position]
    short = min(width, height)
    jx, jy = rng.uniform(-0.035, 0.035, 2)
    r = RADIUS[scene.size] * short * rng.uniform(0.9, 1.1)
    return (ax + jx) * width, (ay + jy) * height, r, tuple(rng.uniform(0, 1, 2))


def render_array(scene: Scene, width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8."""
    cx, cy, r, phase = layout(scene, width, height, seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = COLOURS[scene.background]
    if scene.style in ("striped", "dotted"):
        img[pattern_mask(scene.style, width, height, phase)] = shade(scene.background)
    img[shape_mask(scene.shape, width, height, cx, cy, r, scene.style == "outlined")] = COLOURS[scene.colour]
    return img


def render(scene: Scene, width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(render_array(scene, width, height, seed))


def render_batch(scenes: Any, width: int = 64, height: int = 64, seeds: Any=None) -> np.ndarray:
    """(N, H, W, 3) uint8 for a list of scenes; seeds default to 0..N-1."""
    seeds = range(len(scenes)) if seeds is None else seeds
    return np.stack([render_array(s, width, height, int(k)) for s, k in zip(scenes, seeds)])
