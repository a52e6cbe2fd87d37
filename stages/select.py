"""Stage 3 — selection: CLIP scores pick the few drafts worth finishing.

For draft i with L2-normalised CLIP image embedding x_i:
    prompt fit      p_i = cos(x_i, text(prompt))
    mood-board fit  m_i = cos(x_i, mood-board centroid)
    base score      b_i = w_p * p_i + w_m * m_i
Drafts are kept greedily by maximal marginal relevance (Carbonell & Goldstein, 1998): the next pick
maximises b_i - w_d * max_{j kept} cos(x_i, x_j), so near-duplicates of a kept draft lose out.
Drafts the safety gate flagged (``excluded``: open_nsfw at or above the brief's threshold, ``atelier.safety``)
are scored like the others but never kept.
Every draft's scores and the decision are returned, kept or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atelier.models import Models
from atelier.profiles import ModelSpec
from stages.common import embed_images, embed_texts, load_rgb
from stages.moodboard import Moodboard
from stages.protocol import Input, Stage, parent, uses_model

STAGE_VERSION = 2  # 2: drafts the safety gate flagged are excluded


@dataclass(frozen=True, kw_only=True)
class SelectRequest:
    prompt: str
    keep: int
    weights: tuple[float, float, float]  # prompt fit, mood-board fit, diversity
    excluded: tuple[int, ...] = ()  # indices of drafts the safety gate flagged: never kept
    drafts: tuple[Input, ...] = parent("source")
    moodboard: Input = parent("moodboard")  # the mood-board .npz written by stage 1
    clip: ModelSpec = uses_model("clip")


@dataclass(frozen=True)
class DraftScore:
    index: int
    prompt_score: float
    moodboard_score: float
    diversity_penalty: float
    total: float
    rank: int | None  # 1 = first kept; None = not kept
    excluded: bool = False  # flagged by the safety gate


@dataclass(frozen=True)
class Selection:
    scores: tuple[DraftScore, ...]  # one per draft, in input order
    kept: tuple[int, ...]  # draft indices in rank order


def check_inputs(req: SelectRequest) -> None:
    if not req.drafts:
        raise ValueError("no drafts to select from")
    if any(not 0 <= i < len(req.drafts) for i in req.excluded):
        raise ValueError(f"excluded draft indices {list(req.excluded)} outside 0..{len(req.drafts) - 1}")
    eligible = len(req.drafts) - len(set(req.excluded))
    if eligible == 0:
        raise ValueError(f"the safety gate flagged all {len(req.drafts)} drafts: nothing to select")
    if not 1 <= req.keep <= eligible:
        raise ValueError(f"keep must be 1..{eligible} (the drafts not flagged by the safety gate), got {req.keep}")


def mmr(base: np.ndarray, sim: np.ndarray, keep: int, diversity: float) -> tuple[list[int], np.ndarray]:
    """Greedy maximal-marginal-relevance picks; returns (kept indices, penalty of every item)."""
    kept: list[int] = []
    penalty = np.zeros_like(base)
    for _ in range(keep):
        if kept:
            penalty = diversity * sim[:, kept].max(axis=1)
        score = base - penalty
        score[kept] = -np.inf
        kept.append(int(np.argmax(score)))
    if kept:  # final penalty of every draft against the whole kept set (the kept ones: at pick time)
        final = diversity * np.where(np.eye(len(base), dtype=bool)[:, kept], -np.inf, sim[:, kept]).max(axis=1)
        final[kept[0]] = 0.0
        for n, k in enumerate(kept[1:], start=1):
            final[k] = diversity * sim[k, kept[:n]].max()
        penalty = np.maximum(final, 0.0) if diversity >= 0 else final
    return kept, penalty


def select_drafts(req: SelectRequest, models: Models) -> Selection:
    # 1. Check inputs
    check_inputs(req)
    # 2. Embed drafts and prompt with CLIP; read the mood board
    clip = models.clip(req.clip)
    x = embed_images(clip, [load_rgb(d.path) for d in req.drafts])  # (N, D)
    t = embed_texts(clip, [req.prompt])[0]  # (D,)
    board = Moodboard.from_file(req.moodboard.path)
    # 3. Score
    w_p, w_m, w_d = req.weights
    p = x @ t  # (N,)
    m = x @ board.centroid  # (N,)
    base = w_p * p + w_m * m
    # 4. Pick greedily with a diversity penalty, never a draft the safety gate flagged
    eligible = base.copy()
    eligible[list(req.excluded)] = -np.inf
    kept, penalty = mmr(eligible, x @ x.T, req.keep, w_d)
    rank = {k: n + 1 for n, k in enumerate(kept)}
    scores = tuple(
        DraftScore(i, float(p[i]), float(m[i]), float(penalty[i]), float(base[i] - penalty[i]), rank.get(i),
                   i in req.excluded)
        for i in range(len(req.drafts))
    )
    return Selection(scores, tuple(kept))


# The decision over all drafts is one item: its key names the selection (every kept asset derives from it).
STAGE = Stage("select-decision", STAGE_VERSION, select_drafts, kind="decision")
