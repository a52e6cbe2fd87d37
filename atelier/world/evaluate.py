"""Measurements of micro models against the world's ground truth (used by bench/world_quality.py and tests)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from atelier.world.judge import judge
from atelier.world.render import render
from atelier.world.scene import ATTRIBUTES, VOCAB, Scene, caption, change_attribute, sample_scene


def held_out_scenes(n: int, seed: int = 10_007) -> list[Scene]:
    """Scenes from a generator no training stage uses (renders and jitter are unseen; the vocabulary is
    finite, so attribute combinations can repeat training ones)."""
    rng = np.random.default_rng([seed, 424242])
    return [sample_scene(rng) for _ in range(n)]


def clip_zero_shot(clip: Any, scenes: list[Scene], size: Any=(64, 64), embed_images: Any=None, embed_texts: Any=None) -> dict:
    """Per attribute, N-way: the image against its caption with that attribute set to every value it can
    take (background and object colour exclude each other's value). Returns accuracy and chance."""
    from atelier.world.loading import embed_images as ei
    from atelier.world.loading import embed_texts as et

    ei, et = embed_images or ei, embed_texts or et
    imgs = [render(s, *size, seed=1000 + i) for i, s in enumerate(scenes)]
    x = ei(clip, imgs)
    out = {}
    for attr in ATTRIBUTES:
        correct, chance = [], []
        for i, s in enumerate(scenes):
            values = [v for v in VOCAB[attr]
                      if not (attr == "background" and v == s.colour) and not (attr == "colour" and v == s.background)]
            texts = [caption(replace(s, **{attr: v})) for v in values]
            t = et(clip, texts)
            correct.append(values[int(np.argmax(t @ x[i]))] == getattr(s, attr))
            chance.append(1 / len(values))
        out[attr] = {"accuracy": float(np.mean(correct)), "chance": float(np.mean(chance)), "n": len(scenes)}
    # true caption vs one random hard negative per attribute (binary)
    rng = np.random.default_rng(0)
    pair = []
    for i, s in enumerate(scenes):
        negs = [caption(change_attribute(s, a, rng)) for a in ATTRIBUTES]
        t = et(clip, [caption(s)] + negs)
        pair.append(float(np.mean(t[0] @ x[i] > t[1:] @ x[i])))
    out["pairwise_vs_one_changed"] = {"accuracy": float(np.mean(pair)), "chance": 0.5, "n": len(scenes)}
    return out


def generate(pipe: Any, prompts: list[str], seeds: list[int], width: int, height: int, steps: int, guidance: float,
             negative: str = "", batch: int = 8, **kwargs) -> tuple[list[Image.Image], float]:
    """Images for prompt i with seed i, in batches; returns (images, seconds per image)."""
    from stages.common import generators

    images: list[Image.Image] = []
    t = time.perf_counter()
    for k in range(0, len(prompts), batch):
        p, s = prompts[k:k + batch], seeds[k:k + batch]
        extra = {key: (v[k:k + batch] if key in ("image", "mask_image") else v) for key, v in kwargs.items()}
        r = pipe(prompt=p, negative_prompt=[negative] * len(p) if guidance > 1 else None,
                 width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                 generator=generators(s, "cpu"), **extra)
        images += r.images
    return images, (time.perf_counter() - t) / max(1, len(prompts))


def adherence(images: list[Image.Image], prompts: list) -> dict:
    """Mean judge score and per-attribute match rates."""
    per = {a: [] for a in ATTRIBUTES}
    scores = []
    for im, p in zip(images, prompts):
        j = judge(im, p)
        scores.append(j.score)
        for a, m in j.matches.items():
            per[a].append(m)
    return {"score": float(np.mean(scores)) if scores else float("nan"),
            **{a: float(np.mean(v)) for a, v in per.items() if v}}


def mean_ci(values: Any, seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean and bootstrap 95 % confidence interval."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1) if len(v) else np.array([np.nan])
    return {"mean": float(v.mean()) if len(v) else float("nan"), "ci95": [float(np.percentile(boots, 2.5)),
                                                                           float(np.percentile(boots, 97.5))],
            "n": int(len(v))}


def palette_distance(image: Image.Image, refs: list[Image.Image]) -> float:
    """L1 distance between the 8-colour-class histograms (palette + shades folded) of image and refs."""
    from atelier.world.judge import classify

    def hist(im: Any):
        a = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32)
        h = np.bincount(classify(a).ravel() % 8, minlength=8).astype(float)
        return h / h.sum()

    ref = np.mean([hist(r) for r in refs], axis=0)
    return float(np.abs(hist(image) - ref).sum())
