"""The micro world: a seeded procedural poster renderer, its captions, a caption parser and a pixel judge.

Offline, atelier's models are otherwise random. This package defines a small visual world that a
marketing brief can speak about (background colour, one object with a shape, colour, position and
size, and a style), renders it fast with numpy/PIL, and judges any image against the attributes a
prompt asks for, by pixel rules (no CLIP). ``atelier.world.train`` trains small models on it.

Vocabulary (``scene.VOCAB``)::

    colours   red orange yellow green blue purple white black      (object and background)
    shapes    circle square triangle star cross house
    positions left right top bottom center
    sizes     small large
    styles    flat striped dotted outlined

Caption: ``"a large red circle on the left on a blue background, striped style"``.
"""

from atelier.world.judge import Judgement, judge  # noqa: F401
from atelier.world.render import render, render_batch  # noqa: F401
from atelier.world.scene import (  # noqa: F401
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    VOCAB,
    Scene,
    caption,
    change_attribute,
    parse,
    sample_scene,
)
