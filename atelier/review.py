"""Review gates: what awaits a person's decision, and recording that decision.

A brief with ``review:`` makes a deliverable stop after a selection (``flows.tasks._gate``); the run ends
"awaiting review". This module is what the CLI (``atelier review``) and the review page (``atelier review
--serve``) share: the open gates of a run with their candidates numbered 1..N (CLIP's scores and rank of
each, and CLIP's suggestion), and ``decide()``, which checks a decision against a gate and records it
through ``store.lineage``. Resuming the run (``atelier resume RUN``) then passes the gate.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.errors import UsageError
from store import Store, lineage, queries
from store.schema import Asset, Edge, Gate, Run


@dataclass(frozen=True)
class Candidate:
    number: int  # 1..N, what a reviewer types (--keep 3,5)
    key: str
    path: str  # absolute path of its file
    stage: str  # draft | vary
    clip_rank: int | None  # 1 = CLIP's best total score
    clip_kept: bool  # CLIP's suggestion (its diversity-aware picks)
    total: float | None
    prompt_score: float | None
    moodboard_score: float | None
    parent: str | None  # the image a variation varies (its key)


@dataclass(frozen=True)
class OpenGate:
    run_id: str
    deliverable: str
    round: int
    decision: str
    candidates: tuple[Candidate, ...]

    @property
    def suggestion(self) -> list[int]:
        return [c.number for c in sorted((c for c in self.candidates if c.clip_kept), key=lambda c: c.clip_rank or 0)]

    def to_dict(self) -> dict:
        return {**asdict(self), "suggestion": self.suggestion}


def default_reviewer() -> str:
    try:
        return os.environ.get("ATELIER_REVIEWER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def run_row(store: Store, run_id: str) -> Run:
    with store.sessions() as s:
        run = s.get(Run, run_id)
    if run is None:
        raise UsageError(f"no run {run_id!r} in {store.url} (see `atelier runs`)")
    return run


def open_gates(store: Store, run_id: str, deliverable: str | None = None, round_no: int | None = None) -> list[OpenGate]:
    """The gates of ``run_id`` no person has decided yet (optionally one deliverable's). With ``round_no``, the
    run's gates of that round decided or not: a decision can be given again (the latest one counts)."""
    run_row(store, run_id)
    out = []
    with store.sessions() as s:
        if round_no is None:
            gates = lineage.pending_gates(s, run_id)
        else:
            gates = list(s.scalars(select(Gate).where(Gate.run_id == run_id, Gate.round == round_no)
                                   .order_by(Gate.deliverable)))
        for g in gates:
            if deliverable is not None and g.deliverable != deliverable:
                continue
            out.append(_gate_view(s, store, g))
    return out


def _gate_view(s: Session, store: Store, g: Gate) -> OpenGate:
    scores = {sc.draft_key: sc for sc in lineage.scores_for(s, g.decision)}
    rank = queries.clip_ranks(scores.values())
    assets = {a.key: a for a in s.scalars(select(Asset).where(Asset.key.in_(g.candidates)))}
    inits = dict(s.execute(select(Edge.child, Edge.parent).where(Edge.child.in_(g.candidates), Edge.role == "init")).all())
    cands = []
    for n, key in enumerate(g.candidates, start=1):
        sc, a = scores.get(key), assets[key]
        cands.append(Candidate(n, key, str(store.files.path(a.path)), a.stage, rank.get(key),
                               bool(sc and sc.kept), sc.total if sc else None, sc.prompt_score if sc else None,
                               sc.moodboard_score if sc else None, inits.get(key)))
    return OpenGate(g.run_id, g.deliverable, g.round, g.decision, tuple(cands))


def _numbers(text: str | list[int] | None, option: str, n: int) -> list[int]:
    if text is None or text == "" or text == []:
        return []
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    out = []
    for t in items:
        try:
            k = int(t)
        except (TypeError, ValueError):
            raise UsageError(f"{option}: expected candidate numbers like 3,5, got {t!r}") from None
        if not 1 <= k <= n:
            raise UsageError(f"{option}: candidate {k} does not exist (the gate has candidates 1..{n})")
        if k in out:
            raise UsageError(f"{option}: candidate {k} is given twice")
        out.append(k)
    return out


def parse_stars(items: list[str] | dict | None, n: int) -> dict[int, int]:
    """``["5=4", "2=1"]`` (candidate=stars) → {5: 4, 2: 1}."""
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items or []:
            if "=" not in str(item):
                raise UsageError(f"--star: expected CANDIDATE=STARS like 5=4, got {item!r}")
            pairs.append(tuple(str(item).split("=", 1)))
    out: dict[int, int] = {}
    for c, v in pairs:
        [k] = _numbers(str(c), "--star", n)
        try:
            stars = int(v)
        except (TypeError, ValueError):
            raise UsageError(f"--star: stars must be 1-5, got {v!r}") from None
        if not 1 <= stars <= 5:
            raise UsageError(f"--star: stars must be 1-5, got {stars}")
        out[k] = stars
    return out


def decide(store: Store, gate: OpenGate, keep: str | list[int] | None, reject: str | list[int] | None = None,
           stars: dict[int, int] | None = None, note: str = "", by: str | None = None,
           accept: bool = False) -> int:
    """Record a person's decision at ``gate``: candidates to keep (in order; ``accept``: CLIP's suggestion),
    reject and star. Checks everything before writing; returns the review id."""
    n = len(gate.candidates)
    kept = gate.suggestion if accept else _numbers(keep, "--keep", n)
    if not kept:
        raise UsageError("--keep: keep at least one candidate (or --accept CLIP's suggestion)")
    rejected = _numbers(reject, "--reject", n)
    both = sorted(set(kept) & set(rejected))
    if both:
        raise UsageError(f"--keep and --reject both name candidate {both[0]}")
    if len(note) > 2000:
        raise UsageError("--note: at most 2000 characters")
    key = {c.number: c.key for c in gate.candidates}
    return lineage.record_review(
        store, gate.decision, gate.deliverable, gate.round, [key[k] for k in kept], [key[k] for k in rejected],
        {key[k]: v for k, v in (stars or {}).items()}, note, (by or default_reviewer())[:64], gate.run_id)


def choose_gate(gates: list[OpenGate], run_id: str, deliverable: str | None, round_no: int | None = None) -> OpenGate:
    """The one gate a decision is for: the only open one, or the given deliverable's (and round's)."""
    where = f" for deliverable {deliverable!r}" if deliverable else ""
    if not gates and round_no is not None:
        raise UsageError(f"run {run_id} has no gate at round {round_no}{where}")
    if not gates:
        raise UsageError(f"run {run_id} has nothing awaiting review{where} (see `atelier review {run_id}`)")
    if len(gates) > 1:
        names = ", ".join(f"{g.deliverable} (round {g.round})" for g in gates)
        raise UsageError(f"run {run_id} awaits review for several deliverables: {names}; pick one with --deliverable")
    return gates[0]
