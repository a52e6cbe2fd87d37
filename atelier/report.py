"""Run reports and lineage walks as plain data (the CLI renders them with Rich or as JSON)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from atelier.profiles import PROFILES
from store import queries
from store.queries import STAGE_ORDER
from store.schema import Asset, Run

CHAIN = ["draft", "select", "refine", "inpaint", "face_restore", "upscale"]
# Parameters worth showing per stage in trees (everything is in --json).
SHOWN = {
    "reference": ["source"],
    "moodboard": ["max_style_refs"],
    "draft": ["prompt", "seed", "steps", "scheduler", "width", "height"],
    "select": ["rank", "prompt_score", "moodboard_score", "total"],
    "refine": ["seed", "steps", "strength", "scheduler", "width", "height"],
    "mask": ["region", "source"],
    "inpaint": ["prompt", "seed", "steps"],
    "face_restore": ["faces"],
    "upscale": ["width", "height", "tile"],
}


def run_dict(run: Run) -> dict:
    return {"id": run.id, "campaign": run.campaign, "brief": run.brief_path, "profile": run.profile,
            "status": run.status, "started_at": run.started_at.isoformat(timespec="seconds"),
            "finished_at": run.finished_at.isoformat(timespec="seconds") if run.finished_at else None,
            "seconds": (run.finished_at - run.started_at).total_seconds() if run.finished_at else None,
            "error": run.error,
            "random_weights": PROFILES[run.profile].random_weights if run.profile in PROFILES else None,
            "models_note": PROFILES[run.profile].models_note if run.profile in PROFILES else None}


def asset_dict(a: Asset, full: bool = True) -> dict:
    out = {"key": a.key, "stage": a.stage, "campaign": a.campaign, "deliverable": a.deliverable, "path": a.path,
           "sha256": a.sha256, "width": a.width, "height": a.height, "seconds": round(a.seconds, 4)}
    if full:
        out.update(params=a.params, model=a.model, run_id=a.run_id, created_at=a.created_at.isoformat(timespec="seconds"))
    return out


def run_report(session: Session, run: Run) -> dict:
    """Per stage: assets and seconds; per deliverable: drafts with scores, kept, refined, post-edit, finals."""
    members = queries.run_assets(session, run.id)
    # Counts come from run membership (authoritative); seconds from the stage executions.
    stages: dict[str, dict] = {}
    for ra, a in sorted(members, key=lambda m: STAGE_ORDER.index(m[1].stage) if m[1].stage in STAGE_ORDER else 99):
        agg = stages.setdefault(a.stage, {"assets": 0, "computed": 0, "reused": 0, "seconds": 0.0})
        agg["assets"] += 1
        agg[ra.status] += 1
    per_deliverable: dict[str, dict] = defaultdict(lambda: {"stages": {}})
    for sr in queries.stage_runs(session, run.id):
        agg = stages.setdefault(sr.stage, {"assets": 0, "computed": 0, "reused": 0, "seconds": 0.0})
        agg["seconds"] = round(agg["seconds"] + sr.seconds, 3)
        if sr.deliverable:
            per_deliverable[sr.deliverable]["stages"][sr.stage] = {
                "seconds": round(sr.seconds, 3), "computed": sr.computed, "reused": sr.reused}

    drafts = [a for _, a in members if a.stage == "draft"]
    scores = queries.scores_by_draft(session, [a.key for a in drafts])
    # A draft may be scored by several selections (keep changed between runs): show this run's decision.
    decisions = {a.params.get("decision") for _, a in members if a.stage == "select"}
    finals = {ra.asset_key: ra.export_path for ra, _ in members if ra.final}
    for _, a in sorted(members, key=lambda m: (CHAIN.index(m[1].stage) if m[1].stage in CHAIN else -1, m[1].key)):
        if a.deliverable is None or a.stage not in CHAIN:
            continue
        entry = per_deliverable[a.deliverable].setdefault(a.stage, [])
        item = {"key": a.key, "path": a.path, "width": a.width, "height": a.height}
        if a.stage == "draft":
            item["seed"] = a.params.get("seed")
            item["prompt"] = a.params.get("prompt")
            item["index"] = a.params.get("index")
            sc = next((s for s in scores.get(a.key, []) if s.decision in decisions), None)
            if sc is not None:
                item.update(prompt_score=round(sc.prompt_score, 4), moodboard_score=round(sc.moodboard_score, 4),
                            total=round(sc.total, 4), kept=sc.kept, rank=sc.rank)
        if a.stage == "face_restore":
            item["faces"] = a.params.get("faces", [])
        if a.key in finals:
            item["final"] = finals[a.key]
        entry.append(item)
    for d in per_deliverable.values():
        if "draft" in d:
            d["draft"].sort(key=lambda x: x.get("index") or 0)
        if "select" in d:
            d["select"].sort(key=lambda x: x["key"])
    for name, d in per_deliverable.items():
        d["cost"] = deliverable_cost([a for _, a in members if a.deliverable == name])
        d["moodboard"] = _style_refs(session, [x["key"] for x in d.get("refine", [])])
        d["finals"] = sorted((x for stage in CHAIN for x in d.get(stage, []) if x.get("final")),
                             key=lambda x: x["final"])
        for stage in ("select", "refine", "inpaint", "face_restore", "upscale"):
            for x in d.get(stage, []):
                x["from"] = next((p.key for e, p in queries.parents(session, x["key"])
                                  if e.role in ("source", "init")), None)
    return {"run": run_dict(run), "stages": stages, "deliverables": dict(per_deliverable),
            "finals": sorted(finals.values()), "device": (run.info or {}).get("device")}


def deliverable_cost(assets: list[Asset]) -> dict:
    """Device seconds per stage (each asset's own compute time, reused or not) and the drafting payoff.

    ``savings_vs_full_quality`` compares the chain that ran (all drafts + selection + refining the kept
    ones) with generating every draft at full quality instead: drafts x (refine seconds per image).
    """
    per_stage: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for a in assets:
        per_stage[a.stage] += a.seconds
        counts[a.stage] += 1
    total = sum(per_stage.values())
    explore = per_stage["draft"] + per_stage["select"] + per_stage["refine"]
    out = {"per_stage_s": {k: round(v, 3) for k, v in per_stage.items()}, "total_s": round(total, 3),
           "draft_share": round(per_stage["draft"] / total, 4) if total else None,
           "full_quality_estimate_s": None, "savings_vs_full_quality": None}
    if counts["refine"] and counts["draft"] and per_stage["refine"] > 0:
        full = counts["draft"] * per_stage["refine"] / counts["refine"]
        out["full_quality_estimate_s"] = round(full, 3)
        out["savings_vs_full_quality"] = round(1 - explore / full, 4)
    return out


def lineage_dict(node: dict) -> dict:
    a: Asset = node["asset"]
    return {"role": node["role"], **asset_dict(a), "parents": [lineage_dict(p) for p in node["parents"]]}


def _style_refs(session: Session, refine_keys: list[str]) -> list[dict]:
    """The mood-board references a deliverable was styled with (its refine assets' style-ref parents)."""
    seen: dict[str, dict] = {}
    for key in refine_keys:
        for e, a in queries.parents(session, key):
            if e.role == "style-ref" and a.key not in seen:
                seen[a.key] = {"key": a.key, "source": a.params.get("source"), "path": a.path,
                               "width": a.width, "height": a.height}
    return list(seen.values())


# --------------------------------------------------------------------------- what changed, and diffs
# Bookkeeping and bulky identities, not settings (all in the node's params); width / height are ``size``.
IGNORED = {"decision", "index", "sha256", "centrality", "style_refs", "width", "height"}


def primary_parent(node: dict) -> dict | None:
    """The parent an asset was made *from* (source / init), as opposed to masks and style references."""
    return next((p for p in node["parents"] if p["role"] in ("source", "init")), None)


def annotate_changes(node: dict) -> dict:
    """Add ``changed`` to every node of a lineage tree: {setting: [value before this step, own value]}.

    "Before" is the chain's state at the primary parent: each setting as the nearest ancestor along
    source / init links last set it. So a refine shows ``steps 4→8`` against its draft (through the
    selection, which sets no steps) and keeps its draft's seed unchanged; a root sets everything.
    Size and model count as settings (``size``, ``model``), since both change along a chain.
    """
    def settings(n: dict) -> dict:
        out = {k: v for k, v in (n.get("params") or {}).items() if k not in IGNORED}
        if n.get("width"):
            out["size"] = f"{n['width']}x{n['height']}"
        if (name := model_name(n.get("model"))) is not None:
            out["model"] = name
        return out

    def state(n: dict | None, depth: int = 0) -> dict:
        if n is None or depth > 64:
            return {}
        return {**state(primary_parent(n), depth + 1), **settings(n)}

    def walk(n: dict) -> None:
        before = state(primary_parent(n))
        n["changed"] = {k: [before.get(k), v] for k, v in settings(n).items() if before.get(k) != v}
        for p in n["parents"]:
            walk(p)

    walk(node)
    return node


def model_name(model: dict | None) -> str | None:
    if not model:
        return None
    return model.get("name") or (model.get("pipeline") or {}).get("name")


def flatten(value: Any, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c": [2]} (lists stay values: they compare whole)."""
    if isinstance(value, dict) and value:
        out: dict = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def recipe_diff(a: dict, b: dict) -> dict:
    """What differs between two assets' recipes (``asset_dict`` + parents): field -> [a, b].

    Fields: stage, deliverable, campaign, size, ``params.*``, ``model.*`` (flattened) and ``parents.<role>``
    (the parent keys in each role). Same recipe, same key: two different keys always differ somewhere.
    """
    def fields(x: dict) -> dict:
        out = {"stage": x["stage"], "campaign": x.get("campaign"), "deliverable": x.get("deliverable"),
               "size": f"{x['width']}x{x['height']}" if x.get("width") else None}
        out.update(flatten(x.get("params") or {}, "params."))
        out.update(flatten(x.get("model") or {}, "model."))
        roles: dict[str, list[str]] = defaultdict(list)
        for key, role in x.get("parent_keys", []):
            roles[role].append(key)
        out.update({f"parents.{role}": keys for role, keys in roles.items()})
        return out

    fa, fb = fields(a), fields(b)
    names = list(dict.fromkeys([*fa, *fb]))
    return {k: [fa.get(k), fb.get(k)] for k in names if fa.get(k) != fb.get(k)}
