"""Stage 1 — mood board: embed the brand's reference images with CLIP and keep the style references.

The mood board is the normalised mean of the reference embeddings (its centroid). References are
ranked by cosine similarity to the centroid; the ``max_style_refs`` most central ones become the
style references that IP-Adapter sees in the refine stage (outliers are kept out of the style).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atelier.models import Models
from atelier.profiles import ModelSpec
from stages.common import embed_images, load_rgb
from stages.protocol import Input, Stage, parent, uses_model

STAGE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class MoodboardRequest:
    max_style_refs: int
    references: tuple[Input, ...] = parent("source")
    clip: ModelSpec = uses_model("clip")


@dataclass(frozen=True)
class Moodboard:
    embeddings: np.ndarray  # (N, D) L2-normalised, one row per reference
    centroid: np.ndarray  # (D,) L2-normalised mean of the rows
    centrality: tuple[float, ...]  # cosine(reference_i, centroid)
    style_refs: tuple[int, ...]  # indices into references, most central first

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, embeddings=self.embeddings, centroid=self.centroid,
                 centrality=np.asarray(self.centrality), style_refs=np.asarray(self.style_refs, dtype=np.int64))
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> Moodboard:
        with np.load(path) as z:
            return cls(z["embeddings"], z["centroid"], tuple(float(c) for c in z["centrality"]),
                       tuple(int(i) for i in z["style_refs"]))


def check_inputs(req: MoodboardRequest) -> None:
    if not req.references:
        raise ValueError("a mood board needs at least one reference image")
    if req.max_style_refs < 1:
        raise ValueError(f"max_style_refs must be >= 1, got {req.max_style_refs}")


def build_moodboard(req: MoodboardRequest, models: Models) -> Moodboard:
    # 1. Check inputs
    check_inputs(req)
    # 2. Load the CLIP model (once per process) and the references
    clip = models.clip(req.clip)
    images = [load_rgb(r.path) for r in req.references]
    # 3. Embed and find the centroid
    emb = embed_images(clip, images)  # (N, D)
    centroid = emb.mean(axis=0)
    centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    centrality = emb @ centroid  # (N,)
    # 4. Keep the most central references as style references (stable order for equal scores)
    order = sorted(range(len(images)), key=lambda i: (-float(centrality[i]), i))
    return Moodboard(emb, centroid, tuple(float(c) for c in centrality), tuple(order[: req.max_style_refs]))


STAGE = Stage("moodboard", STAGE_VERSION, build_moodboard, kind="embedding")
