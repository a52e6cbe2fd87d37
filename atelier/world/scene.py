"""Scenes of the micro world: vocabulary, sampling, templated captions and a caption parser."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

# name -> sRGB. Distinct hues and lightness, so a pixel rule can tell them apart after a blurry decoder.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "house")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
STYLES = ("flat", "striped", "dotted", "outlined")
ATTRIBUTES = ("background", "colour", "shape", "position", "size", "style")
VOCAB = {
    "background": tuple(COLOURS), "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS,
    "size": SIZES, "style": STYLES,
}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
# Object centre, as fractions of width and height.
ANCHORS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
# Object "radius" (half its bounding box) as a fraction of the image's short side.
RADIUS = {"small": 0.13, "large": 0.25}


def shade(name: str) -> tuple[int, int, int]:
    """The second colour of a background's pattern (stripes, dots): lighter for dark colours, darker for light."""
    c = np.array(COLOURS[name], dtype=np.float32)
    lum = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255
    target, t = (np.zeros(3), 0.35) if lum > 0.55 else (np.full(3, 255.0), 0.45)
    return tuple(int(round(v)) for v in c * (1 - t) + target * t)


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str
    shape: str
    position: str
    size: str
    style: str

    def __post_init__(self):
        for attr in ATTRIBUTES:
            if getattr(self, attr) not in VOCAB[attr]:
                raise ValueError(f"{attr} must be one of {', '.join(VOCAB[attr])}, got {getattr(self, attr)!r}")
        if self.colour == self.background:
            raise ValueError(f"object colour and background are both {self.colour}")

    def attributes(self) -> dict[str, str]:
        return asdict(self)


def sample_scene(rng: np.random.Generator) -> Scene:
    bg = str(rng.choice(list(COLOURS)))
    colour = str(rng.choice([c for c in COLOURS if c != bg]))
    return Scene(bg, colour, str(rng.choice(SHAPES)), str(rng.choice(POSITIONS)), str(rng.choice(SIZES)),
                 str(rng.choice(STYLES)))


def change_attribute(scene: Scene, attr: str, rng: np.random.Generator) -> Scene:
    """The same scene with ``attr`` set to a different valid value (a hard negative)."""
    choices = [v for v in VOCAB[attr] if v != getattr(scene, attr)]
    if attr == "background":
        choices = [v for v in choices if v != scene.colour]
    if attr == "colour":
        choices = [v for v in choices if v != scene.background]
    return replace(scene, **{attr: str(rng.choice(choices))})


TEMPLATES = (
    "a {size} {colour} {shape} {pos} on a {background} background, {style} style",
    "{style} poster of a {size} {colour} {shape} {pos}, {background} background",
    "a {background} background with a {size} {colour} {shape} {pos}, {style} style",
)


def caption(scene: Scene | dict, template: int = 0, drop: tuple[str, ...] = ()) -> str:
    """Templated English caption. ``drop`` leaves attributes out (they are then unspecified)."""
    a = scene.attributes() if isinstance(scene, Scene) else dict(scene)
    if template == 0 or drop:
        parts = ["a"]
        if "size" not in drop:
            parts.append(a["size"])
        if "colour" not in drop:
            parts.append(a["colour"])
        parts.append(a["shape"] if "shape" not in drop else "shape")
        if "position" not in drop:
            parts.append(POSITION_PHRASE[a["position"]])
        text = " ".join(parts)
        if "background" not in drop:
            text += f" on a {a['background']} background"
        if "style" not in drop:
            text += f", {a['style']} style"
        return text
    return TEMPLATES[template].format(pos=POSITION_PHRASE[a["position"]], **a)


_SYNONYMS = {
    "shape": {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle", "ball": "circle",
              "round": "circle", "dot": None, "square": "square", "squares": "square", "box": "square",
              "triangle": "triangle", "triangles": "triangle", "star": "star", "stars": "star", "cross": "cross",
              "plus": "cross", "house": "house", "houses": "house", "home": "house"},
    "position": {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
                 "center": "center", "centre": "center", "middle": "center", "centered": "center",
                 "centred": "center"},
    "size": {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large",
             "huge": "large"},
    "style": {"flat": "flat", "plain": "flat", "solid": "flat", "striped": "striped", "stripes": "striped",
              "stripy": "striped", "dotted": "dotted", "dots": "dotted", "polka": "dotted", "outlined": "outlined",
              "outline": "outlined", "line": "outlined"},
}
_COLOUR_SYNONYMS = {**{c: c for c in COLOURS}, "violet": "purple", "grey": None, "gray": None}


def parse(text: str) -> dict[str, str | None]:
    """Attributes a caption or prompt asks for; ``None`` where it says nothing (order of words is free).

    A colour word followed by "background" (or "backdrop") is the background; the colour closest before
    the shape word (or otherwise the first other colour) is the object's.
    """
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    colours = [(i, _COLOUR_SYNONYMS[w]) for i, w in enumerate(words) if _COLOUR_SYNONYMS.get(w)]
    bg_idx = None
    for i, c in colours:
        if i + 1 < len(words) and words[i + 1] in ("background", "backdrop", "sky", "wall"):
            out["background"], bg_idx = c, i
            break
    for attr in ("shape", "position", "size", "style"):
        for w in words:
            if _SYNONYMS[attr].get(w):
                out[attr] = _SYNONYMS[attr][w]
                break
    shape_idx = next((i for i, w in enumerate(words) if _SYNONYMS["shape"].get(w)), None)
    others = [(i, c) for i, c in colours if i != bg_idx]
    if others:
        before = [(i, c) for i, c in others if shape_idx is not None and i < shape_idx]
        out["colour"] = (before[-1] if before else others[0])[1]
    return out
