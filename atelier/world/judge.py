"""A pixel-rule judge: does an image show what a prompt asks for? No CLIP, no learning.

Rules (every pixel is classed to the nearest of the 8 palette colours or their 8 pattern shades):

- background: the most common class on the image's border frame (a shade counts as its colour);
- object colour: the most common non-background class elsewhere (>= 0.5 % of the image), and the
  object mask is the pixels of that class;
- position: the anchor (``scene.ANCHORS``) nearest the mask's centroid, in fractions of width/height;
- size: the filled mask's 3rd-97th percentile box (longer side) over the short side: < 0.32 small;
- shape: the filled (holes closed) mask, cropped to its box and resized to 24x24, against each shape's
  filled template: highest IoU;
- style: ``outlined`` if the mask covers < 72 % of its filled area; else the share of background pixels
  (away from the object) in the background's shade: < 7 % ``flat``; otherwise ``striped`` when the
  shade pattern changes much more along the main diagonal than along the anti-diagonal (the stripes'
  direction), else ``dotted``.

``judge(image, "a large red circle on the left ...")`` returns a ``Judgement`` with the predicted value
of every attribute and, for each attribute the prompt asks for, whether it matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from atelier.world.render import shape_mask
from atelier.world.scene import ANCHORS, ATTRIBUTES, COLOURS, SHAPES, Scene, parse, shade

_NAMES = list(COLOURS)
_CLASSES = np.array([COLOURS[c] for c in _NAMES] + [shade(c) for c in _NAMES], dtype=np.float32)  # (16, 3)
_T = 24  # template side


@dataclass
class Judgement:
    predicted: dict[str, str | None]
    requested: dict[str, str | None]
    matches: dict[str, bool] = field(default_factory=dict)  # only the attributes the prompt asks for
    object_found: bool = True

    @property
    def score(self) -> float:
        """Fraction of requested attributes that match (1.0 when nothing is requested)."""
        return float(np.mean(list(self.matches.values()))) if self.matches else 1.0


def _template(shape: str) -> np.ndarray:
    m = shape_mask(shape, 100, 100, 50, 50, 45, outlined=False)
    return _crop_resize(m)


def _crop_resize(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    im = Image.fromarray((crop * 255).astype(np.uint8)).resize((_T, _T), Image.Resampling.BILINEAR)
    return np.asarray(im) > 127


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    pad = np.pad(mask, 1).astype(np.uint8) * 255
    im = Image.fromarray(pad).copy()  # fromarray may share a read-only buffer
    ImageDraw.floodfill(im, (0, 0), 128)
    return (np.asarray(im) != 128)[1:-1, 1:-1]


def classify(arr: np.ndarray) -> np.ndarray:
    """(H, W) class index 0..15: 0..7 palette colours (``COLOURS`` order), 8..15 their shades."""
    d = ((arr[:, :, None, :] - _CLASSES[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _as_requested(prompt: Any) -> dict[str, str | None]:
    if isinstance(prompt, Scene):
        return prompt.attributes()
    if isinstance(prompt, str):
        return parse(prompt)
    return {a: prompt.get(a) for a in ATTRIBUTES}


def analyse(image: Image.Image | np.ndarray) -> tuple[dict[str, str | None], bool]:
    """Predicted attributes of an image (``None`` where the rule cannot tell) and whether an object was found."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    if min(h, w) > 128:  # judging is about layout and colour: 128 px on the short side is plenty
        s = 128 / min(h, w)
        arr = np.asarray(Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                     Image.Resampling.BOX))
        h, w = arr.shape[:2]
    cls = classify(arr.astype(np.float32))
    base = cls % 8
    short = min(h, w)
    f = max(1, round(0.06 * short))
    frame = np.ones((h, w), dtype=bool)
    frame[f:-f, f:-f] = False
    bg = int(np.bincount(base[frame], minlength=8).argmax())
    pred: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    pred["background"] = _NAMES[bg]
    candidates = base != bg
    counts = np.bincount(base[candidates], minlength=8)
    if counts.max() < 0.005 * h * w:
        return pred, False
    obj = int(counts.argmax())
    pred["colour"] = _NAMES[obj]
    mask = base == obj
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    pred["position"] = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    # shape: clip the mask to its robust box first, so a few stray pixels do not stretch the crop
    mx, my = 0.1 * (x1 - x0) + 1, 0.1 * (y1 - y0) + 1
    box = np.zeros_like(mask)
    box[max(0, int(y0 - my)): int(y1 + my) + 1, max(0, int(x0 - mx)): int(x1 + mx) + 1] = True
    filled = _fill_holes(mask & box)
    # size from the 3rd-97th percentile box of the filled mask inside the robust box, so a few stray
    # pixels of a blurry generated image do not stretch it
    fy, fx = np.nonzero(filled) if filled.any() else (ys, xs)
    sx0, sx1 = np.percentile(fx, [3, 97])
    sy0, sy1 = np.percentile(fy, [3, 97])
    extent = max(sx1 - sx0 + 1, sy1 - sy0 + 1) / short
    pred["size"] = "small" if extent < 0.32 else "large"
    if filled.sum() >= 4:
        m = _crop_resize(filled)
        templates = {s: _template(s) for s in SHAPES}  # 100x100 masks: cheap to draw, no cache kept
        ious = {s: (m & templates[s]).sum() / max(1, (m | templates[s]).sum()) for s in SHAPES}
        pred["shape"] = max(ious, key=ious.get)
    # style
    if (mask & box).sum() < 0.72 * max(1, filled.sum()):
        pred["style"] = "outlined"
    else:
        pad = max(2, round(0.05 * short))
        away = np.ones((h, w), dtype=bool)
        away[max(0, int(y0) - pad): int(y1) + pad + 1, max(0, int(x0) - pad): int(x1) + pad + 1] = False
        region = away & ((cls == bg) | (cls == bg + 8))
        s = (cls == bg + 8) & region
        if region.sum() < 0.05 * h * w or s.sum() < 0.07 * region.sum():
            pred["style"] = "flat"
        else:
            both_main = region[1:, 1:] & region[:-1, :-1]
            both_anti = region[1:, :-1] & region[:-1, 1:]
            t_main = (s[1:, 1:] != s[:-1, :-1])[both_main].mean() if both_main.any() else 0.0
            t_anti = (s[1:, :-1] != s[:-1, 1:])[both_anti].mean() if both_anti.any() else 0.0
            pred["style"] = "striped" if t_main > 2.0 * t_anti + 0.02 else "dotted"
    return pred, True


def judge(image: Image.Image | np.ndarray, prompt: str | Scene | dict) -> Judgement:
    """Score ``image`` against the attributes ``prompt`` (a caption, a Scene or an attribute dict) asks for."""
    requested = _as_requested(prompt)
    pred, found = analyse(image)
    matches = {a: pred[a] == v for a, v in requested.items() if v is not None}
    return Judgement(pred, requested, matches, found)
