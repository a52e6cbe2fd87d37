"""Seeded training batches from the micro world (numpy; torch tensors made by the callers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from atelier.world.render import render_array
from atelier.world.scene import ATTRIBUTES, Scene, caption, change_attribute, sample_scene

# How often each attribute is the one changed in a hard-negative pair: the hard ones more often.
HARD_NEGATIVE_WEIGHTS = {"background": 0.08, "colour": 0.1, "shape": 0.3, "position": 0.25, "size": 0.15,
                         "style": 0.12}
ASPECTS = ((1, 1), (1, 1), (1, 1), (16, 9), (9, 16), (4, 3), (3, 4))


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The generator of one training step: batches depend on (seed, stage, step) only, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, sum(map(ord, stage)) * 7919, step])


def random_caption(scene: Scene, rng: np.random.Generator, keep: str | None = None, p_drop: float = 0.15) -> str:
    """A caption with a random template; with probability ``p_drop`` one or two attributes are left out
    (never ``keep``), so partial prompts ("a red circle") mean something too."""
    drop: tuple[str, ...] = ()
    if rng.random() < p_drop:
        pool = [a for a in ATTRIBUTES if a != keep and a != "shape"]
        drop = tuple(rng.choice(pool, size=int(rng.integers(1, 3)), replace=False))
    return caption(scene, template=int(rng.choice(3, p=[0.6, 0.2, 0.2])), drop=drop)


def size_for(aspect: tuple[int, int], short: int, multiple: int = 1) -> tuple[int, int]:
    """(width, height) with the given short side (rounded to ``multiple``) and aspect."""
    a, b = aspect
    w, h = (short * a / b, short) if a >= b else (short, short * b / a)
    return max(multiple, int(round(w / multiple)) * multiple), max(multiple, int(round(h / multiple)) * multiple)


def pair_batch(n_pairs: int, rng: np.random.Generator, width: int, height: int) -> Any:
    """2 * n_pairs images and captions: scene i and, at i + n_pairs, the same scene (same jitter) with
    one attribute changed. Returns (images (N, H, W, 3) uint8, captions, scenes)."""
    scenes, captions, seeds = [], [], []
    firsts = [sample_scene(rng) for _ in range(n_pairs)]
    attrs = list(HARD_NEGATIVE_WEIGHTS)
    p = np.array(list(HARD_NEGATIVE_WEIGHTS.values()))
    seconds, caps1, caps2 = [], [], []
    for s in firsts:
        attr = str(rng.choice(attrs, p=p / p.sum()))
        t = change_attribute(s, attr, rng)
        seconds.append(t)
        drop_state = rng.bit_generator.state
        caps1.append(random_caption(s, rng, keep=attr))
        rng.bit_generator.state = drop_state  # same template and dropped attributes for both
        caps2.append(random_caption(t, rng, keep=attr))
    scenes = firsts + seconds
    captions = caps1 + caps2
    seeds = list(rng.integers(0, 2**31, n_pairs)) * 2
    images = np.stack([render_array(s, width, height, int(k)) for s, k in zip(scenes, seeds)])
    return images, captions, scenes


def scene_batch(n: int, rng: np.random.Generator, width: int, height: int, p_drop: float = 0.1) -> Any:
    """n random scenes rendered at (width, height) with random captions: (images, captions, scenes)."""
    scenes = [sample_scene(rng) for _ in range(n)]
    captions = [random_caption(s, rng, p_drop=p_drop) for s in scenes]
    images = np.stack([render_array(s, width, height, int(rng.integers(0, 2**31))) for s in scenes])
    return images, captions, scenes
