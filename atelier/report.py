"""Run reports and lineage walks as plain data (the CLI renders them with Rich or as JSON)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from atelier.profiles import PROFILES
from store import lineage, queries
from store.queries import STAGE_ORDER
from store.schema import Asset, Gate, Rating, Review, Run

CHAIN = ["draft", "vary", "select", "pick", "refine", "inpaint", "face_restore", "upscale"]
# Parameters worth showing per stage in trees (everything is in --json).
SHOWN = {
    "reference": ["source"],
    "moodboard": ["max_style_refs"],
    "draft": ["prompt", "seed", "steps", "scheduler", "width", "height"],
    "select": ["rank", "prompt_score", "moodboard_score", "total"],
    "refine": ["seed", "steps", "strength", "scheduler", "width", "height"],
    "mask": ["region", "source"],
    "inpaint": ["prompt", "seed", "steps"],
    "face_restore": ["faces", "detector", "identity"],
    "safety": ["nsfw", "classifier"],
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


def rating_dict(r: Rating) -> dict:
    """An asset's rating as data: stars (1-5 or None), rejected, note, by whom, when."""
    return {"stars": r.stars, "rejected": bool(r.rejected), "note": r.note or "", "by": r.by,
            "at": r.created_at.isoformat(timespec="seconds"), "id": r.id}


def review_dict(r: Review) -> dict:
    return {"id": r.id, "by": r.by, "note": r.note or "", "at": r.created_at.isoformat(timespec="seconds"),
            "kept": list(r.kept), "rejected": list(r.rejected), "stars": dict(r.stars or {})}


def run_dollars(members: list[tuple[Any, Asset]]) -> dict | None:
    """What a run's hosted-backend requests cost (``atelier.backends.costs.summarize`` over its assets), with
    ``price_tables`` (backend:model -> the date its price table was taken); None when no asset is remote."""
    from atelier.backends import costs

    rows = costs.cost_rows(members)
    tables = {}
    for row in rows:
        facts = row.params.get("remote")
        if isinstance(facts, dict):
            tables[f"{facts.get('backend')}:{facts.get('model')}"] = facts.get("price_table") or None
    if not tables:
        return None
    return {**costs.summarize(rows), "price_tables": dict(sorted(tables.items()))}


def run_report(session: Session, run: Run) -> dict:
    """Per stage: assets and seconds; per deliverable: drafts with scores, kept, refined, post-edit, finals,
    and its ``rounds`` (see ``_rounds``); ``awaiting``: the review gates the run stopped at. ``dollars``: what
    its hosted-backend requests cost (``run_dollars``; None without remote assets); each remote asset's item
    has its ``usd`` (None: no price table) and ``usd_this_run`` ($0 when reused)."""
    members = queries.run_assets(session, run.id)
    dollars = run_dollars(members)
    per_asset = dollars.pop("per_asset") if dollars else {}
    paid = {a.key for ra, a in members if ra.status == "computed"}
    # Counts come from run membership (authoritative); seconds from the stage executions.
    stages: dict[str, dict] = {}
    for ra, a in sorted(members, key=lambda m: STAGE_ORDER.index(m[1].stage) if m[1].stage in STAGE_ORDER else 99):
        agg = stages.setdefault(a.stage, {"assets": 0, "computed": 0, "reused": 0, "seconds": 0.0})
        agg["assets"] += 1
        agg[ra.status] += 1
    per_deliverable: dict[str, dict] = defaultdict(lambda: {"stages": {}})
    # A deliverable's stage runs once per round (select, vary, pick) and once per pass of a resumed run.
    rows: dict[tuple[str, int, str], list] = defaultdict(list)  # (deliverable, round, stage) -> its executions
    current_round: dict[str, int] = {}
    for sr in queries.stage_runs(session, run.id):
        agg = stages.setdefault(sr.stage, {"assets": 0, "computed": 0, "reused": 0, "seconds": 0.0})
        agg["seconds"] = round(agg["seconds"] + sr.seconds, 3)
        if sr.deliverable:
            # Rounds run in order (draft, select, [pick], vary, select, ...); each pass starts at draft.
            if sr.stage == "draft":
                current_round[sr.deliverable] = 0
            elif sr.stage == "vary":
                current_round[sr.deliverable] = current_round.get(sr.deliverable, 0) + 1
            rows[sr.deliverable, current_round.get(sr.deliverable, 0), sr.stage].append(sr)
    round_seconds: dict[tuple[str, int, str], float] = {}
    for (name, n, stage), execs in rows.items():
        # Seconds add up over passes; computed too (a pass computes what no earlier one did); reused is what the
        # last pass found stored that no pass of this run computed.
        computed = sum(x.computed for x in execs)
        reused = max(0, execs[-1].computed + execs[-1].reused - computed)
        seconds = sum(x.seconds for x in execs)
        round_seconds[name, n, stage] = seconds
        entry = per_deliverable[name]["stages"].setdefault(stage, {"seconds": 0.0, "computed": 0, "reused": 0})
        entry.update(seconds=round(entry["seconds"] + seconds, 3), computed=entry["computed"] + computed,
                     reused=entry["reused"] + reused)

    candidates = [a for _, a in members if a.stage in ("draft", "vary")]
    scores = queries.scores_by_draft(session, [a.key for a in candidates])
    # A draft may be scored by several selections (keep changed between runs): show this run's decision.
    decisions = {a.params.get("decision") for _, a in members if a.stage == "select"}
    gates = queries.run_gates(session, run.id)
    decisions |= {g.decision for g in gates}
    clip_rank = _clip_ranks(session, decisions)
    finals = {ra.asset_key: ra.export_path for ra, _ in members if ra.final}
    gate = (run.info or {}).get("safety") or {}  # the safety gate's decisions, by deliverable and key
    ratings = queries.latest_ratings(session, [a.key for _, a in members])
    for _, a in sorted(members, key=lambda m: (CHAIN.index(m[1].stage) if m[1].stage in CHAIN else -1, m[1].key)):
        if a.deliverable is None or a.stage not in CHAIN:
            continue
        entry = per_deliverable[a.deliverable].setdefault(a.stage, [])
        item = {"key": a.key, "path": a.path, "width": a.width, "height": a.height}
        p = a.params or {}
        if a.stage in ("draft", "vary", "select", "pick"):
            item["seconds"] = round(a.seconds, 4)  # device seconds (for a round's cost)
        if a.stage in ("draft", "vary"):
            item["seed"] = p.get("seed")
            item["prompt"] = p.get("prompt")
            if a.stage == "draft":
                item["index"] = p.get("index")
            else:
                item.update(round=p.get("round"), strength=p.get("strength"), variation=p.get("variation"))
            sc = next((s for s in scores.get(a.key, []) if s.decision in decisions), None)
            if sc is not None:
                item.update(prompt_score=round(sc.prompt_score, 4), moodboard_score=round(sc.moodboard_score, 4),
                            total=round(sc.total, 4), kept=sc.kept, rank=sc.rank,
                            clip_rank=clip_rank.get((sc.decision, a.key)), decision=sc.decision)
        if a.stage == "select":
            item.update(round=p.get("round", 0), rank=p.get("rank"), decision=p.get("decision"))
        if a.stage == "pick":
            item.update(round=p.get("round"), order=p.get("order"), by=p.get("kept_by"), note=p.get("note") or "",
                        clip_rank=p.get("clip_rank"), candidates=p.get("candidates"), stars=p.get("stars"),
                        review=p.get("review"), reviewed_at=p.get("reviewed_at"), decision=p.get("gate"))
        if a.stage == "face_restore":
            item.update(faces=p.get("faces", []), detector=p.get("detector"), identity=p.get("identity", []),
                        identity_threshold=p.get("identity_threshold"))
        if a.key in gate.get(a.deliverable, {}):
            item["safety"] = gate[a.deliverable][a.key]
        if a.key in per_asset:  # what its request cost, and what it cost this run ($0: reused)
            item["usd"] = per_asset[a.key]
            item["usd_this_run"] = per_asset[a.key] if a.key in paid else 0.0
        if a.key in ratings:
            item["rating"] = rating_dict(ratings[a.key])
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
        d["moodboard"] = _style_refs(session, [x["key"] for x in d.get("refine", [])]) or [
            # no refine yet (the run awaits review): the run's references
            {"key": a.key, "source": a.params.get("source"), "path": a.path, "width": a.width, "height": a.height}
            for _, a in sorted(members, key=lambda m: (str(m[1].params.get("source")), m[1].key)) if a.stage == "reference"]
        d["finals"] = sorted((x for stage in CHAIN for x in d.get(stage, []) if x.get("final")),
                             key=lambda x: x["final"])
        d["blocked"] = [x for stage in CHAIN for x in d.get(stage, [])
                        if (x.get("safety") or {}).get("of") == "final" and x["safety"]["decision"] == "block"]
        for stage in ("vary", "select", "pick", "refine", "inpaint", "face_restore", "upscale"):
            for x in d.get(stage, []):
                x["from"] = next((p.key for e, p in queries.parents(session, x["key"])
                                  if e.role in ("source", "init")), None)
    reviews = _reviews(session, per_deliverable, decisions)
    awaiting = []
    for name, d in per_deliverable.items():
        d["rounds"] = _rounds(d, [g for g in gates if g.deliverable == name], reviews, ratings,
                              {(n, st): v for (dn, n, st), v in round_seconds.items() if dn == name})
        d["awaiting"] = next(({"deliverable": name, **r["gate"], "round": r["round"]} for r in d["rounds"]
                              if r["gate"] and r["gate"]["status"] != "passed"), None)
        if d["awaiting"]:
            awaiting.append(d["awaiting"])
    return {"run": run_dict(run), "stages": stages, "deliverables": dict(per_deliverable),
            "finals": sorted(finals.values()), "device": (run.info or {}).get("device"), "awaiting": awaiting,
            "blocked": lineage.safety_blocked(run),
            "dollars": dollars}


def candidate_names(d: dict) -> dict[str, str]:
    """key -> how a deliverable's candidates are named: ``draft #2`` (draft index 2), ``r1.3`` (round 1's
    candidate 3, the number a reviewer types); CLIP's selection and a person's picks (same bytes) by their
    candidate's name."""
    names = {}
    for rd in d.get("rounds") or []:
        for x in rd["candidates"]:
            names[x["key"]] = f"draft #{x.get('index')}" if rd["round"] == 0 else f"r{rd['round']}.{x['number']}"
    for x in [*d.get("select", []), *d.get("pick", [])]:
        names[x["key"]] = names.get(x.get("from"), x["key"][:10])
    return names


def _clip_ranks(session: Session, decisions: set[str]) -> dict[tuple[str, str], int]:
    """(decision, candidate key) -> CLIP's rank of the candidate by total score (1 = best), as a reviewer sees it."""
    out = {}
    for decision in decisions:
        if decision:
            ranks = queries.clip_ranks(lineage.scores_for(session, decision))
            out.update({(decision, key): n for key, n in ranks.items()})
    return out


def _reviews(session: Session, per_deliverable: dict, decisions: set[str]) -> dict[str, dict]:
    """decision -> the review that counts for this run: the one its picks were made from, else the latest
    (decided after the run stopped; a resume will use it)."""
    ids = {x.get("review") for d in per_deliverable.values() for x in d.get("pick", [])}
    by_id = queries.reviews_by_id(session, ids)
    out = {decision: review_dict(r) for decision, r in queries.latest_reviews(session, decisions).items()}
    for d in per_deliverable.values():
        for x in d.get("pick", []):
            if x.get("review") in by_id:
                out[x["decision"]] = review_dict(by_id[x["review"]])
    return out


def _rounds(d: dict, gates: list[Gate], reviews: dict[str, dict], ratings: dict[str, Rating],
            seconds: dict[tuple[int, str], float]) -> list[dict]:
    """A deliverable's rounds, in order: round 0 = the drafts, round n = the n-th variation round. Each:

    ``candidates`` (draft / vary items, in the order a reviewer numbers them, with ``number``; CLIP's
    ``kept`` / ``rank`` and ``clip_rank``; ``picked`` = the person's order and ``picked_by``; ``rating``: the
    latest rating of the candidate or its same-bytes twins, the selection and the pick), ``clip_kept``
    (CLIP's selection: candidate keys in rank order), ``picks`` (the person's, pick items in order),
    ``review`` (who, note, kept / rejected / stars), ``gate`` (None when CLIP alone decides; else ``status``
    awaiting | decided | passed, ``candidates``, ``suggestion``: CLIP's picks as candidate numbers), ``goes_on``
    (candidate keys the next step takes: the person's picks if any, else CLIP's), ``seconds`` (wall, all passes)
    and ``cost_s`` (device seconds of its assets) per stage.
    """
    by_round: dict[int, dict] = {}

    def rnd(n: int) -> dict:
        return by_round.setdefault(n, {"round": n, "kind": "drafts" if n == 0 else "variations", "strength": None,
                                       "candidates": [], "decision": None, "clip_kept": [], "picks": [],
                                       "review": None, "gate": None, "goes_on": [], "seconds": {}})

    for x in d.get("draft", []):
        rnd(0)["candidates"].append(x)
    for x in d.get("vary", []):
        r = rnd(x.get("round") or 1)
        r["candidates"].append(x)
        r["strength"] = x.get("strength")
    selects = sorted(d.get("select", []), key=lambda x: (x.get("round") or 0, x.get("rank") or 0))
    for x in selects:
        r = rnd(x.get("round") or 0)
        r["decision"] = r["decision"] or x.get("decision")
        if x.get("from"):
            r["clip_kept"].append(x["from"])
    for x in sorted(d.get("pick", []), key=lambda x: (x.get("round") or 0, x.get("order") or 0)):
        r = rnd(x.get("round") or 0)
        r["decision"] = r["decision"] or x.get("decision")
        r["picks"].append(x)
    gate_of = {g.round: g for g in gates}
    for g in gates:
        rnd(g.round)["decision"] = rnd(g.round)["decision"] or g.decision
    # Variations follow the image they vary (its position in the round before's kept list), then their number.
    order = {0: {}}
    for n in sorted(by_round):
        r = by_round[n]
        if n > 0:
            before = order.get(n - 1, {})
            r["candidates"].sort(key=lambda x: (before.get(x.get("from"), 99), x.get("variation") or 0, x["key"]))
        g = gate_of.get(n)
        if g is not None:  # the gate's own numbering is what a reviewer typed
            pos = {k: i for i, k in enumerate(g.candidates)}
            r["candidates"].sort(key=lambda x: pos.get(x["key"], len(pos)))
        for i, x in enumerate(r["candidates"], start=1):
            x["number"] = i
        twins: dict[str, list[str]] = defaultdict(list)  # same bytes, other rows: CLIP's selection, the pick
        for x in selects:
            if (x.get("round") or 0) == n and x.get("from"):
                twins[x["from"]].append(x["key"])
        picked = {p["from"]: p for p in r["picks"] if p.get("from")}
        for p in r["picks"]:
            twins[p.get("from")].append(p["key"])
        for x in r["candidates"]:
            if x["key"] in picked:
                x["picked"], x["picked_by"] = picked[x["key"]]["order"], picked[x["key"]]["by"]
            own = [ratings[k] for k in [x["key"], *twins.get(x["key"], [])] if k in ratings]
            if own:
                x["rating"] = rating_dict(max(own, key=lambda rt: rt.id))
        # (a decision a person reviewed in another run, which this one did not gate, is CLIP's here)
        r["review"] = reviews.get(r["decision"]) if r["decision"] and (g is not None or r["picks"]) else None
        if g is not None:
            rank = {k: i for i, k in enumerate(r["clip_kept"])}
            status = "passed" if r["picks"] else "decided" if r["review"] else "awaiting"
            r["gate"] = {"status": status, "decision": g.decision, "candidates": len(g.candidates),
                         "suggestion": [x["number"] for x in sorted((x for x in r["candidates"] if x["key"] in rank),
                                                                    key=lambda x: rank[x["key"]])]}
        r["goes_on"] = [p["from"] for p in r["picks"]] if r["picks"] else [] if g is not None else list(r["clip_kept"])
        # what the next round varies: select / pick keys (its inits) -> position
        order[n] = {k: i for i, k in enumerate(
            [p["key"] for p in r["picks"]] or [x["key"] for x in selects if (x.get("round") or 0) == n])}
        stages_here = ("draft", "select", "pick") if n == 0 else ("vary", "select", "pick")
        r["seconds"] = {st: round(seconds[n, st], 3) for st in stages_here if (n, st) in seconds}
        r["cost_s"] = {stages_here[0]: round(sum(x.get("seconds", 0) for x in r["candidates"]), 3),
                       "select": round(sum(x.get("seconds", 0) for x in selects if (x.get("round") or 0) == n), 3),
                       "pick": round(sum(x.get("seconds", 0) for x in r["picks"]), 3)}
    return [by_round[n] for n in sorted(by_round)]


def deliverable_cost(assets: list[Asset]) -> dict:
    """Device seconds per stage (each asset's own compute time, reused or not) and the drafting payoff.

    ``savings_vs_full_quality`` compares the chain that ran (all drafts + every round's variations + selection +
    refining the kept ones) with generating every draft at full quality instead: drafts x (refine seconds per
    image).
    """
    per_stage: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for a in assets:
        per_stage[a.stage] += a.seconds
        counts[a.stage] += 1
    total = sum(per_stage.values())
    explore = per_stage["draft"] + per_stage["vary"] + per_stage["select"] + per_stage["refine"]
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
# A pick's params say who decided, when and why (``pick`` of ``annotate_rounds``), not how it was made.
PICK_FIELDS = {"gate", "round", "kept_by", "note", "review", "reviewed_at", "order", "clip_rank", "candidates", "stars"}


def pick_text(pick: dict) -> str:
    """"kept by ana (CLIP rank 3 of 8): the calm one" for a pick's params."""
    rank = (f" (CLIP rank {pick['clip_rank']} of {pick['candidates']})" if pick.get("clip_rank") is not None
            else "")
    stars = f" ★{pick['stars']}" if pick.get("stars") else ""
    note = f": {pick['note']}" if pick.get("note") else ""
    return f"kept by {pick.get('kept_by') or 'someone'}{rank}{stars}{note}"


def variation_text(v: dict) -> str:
    """"round 1 · strength 0.5 (subtle)" for a variation's params."""
    from atelier.brief import VARY

    name = next((k for k, x in VARY.items() if v.get("strength") is not None and abs(x - v["strength"]) < 1e-9), None)
    strength = f" · strength {v['strength']:g}" + (f" ({name})" if name else "") if v.get("strength") is not None else ""
    return f"round {v.get('round')}{strength}"


def annotate_rounds(node: dict, ratings: dict[str, dict] | None = None) -> dict:
    """Add to the nodes of a lineage tree what rounds and review say: ``pick`` (a person's decision: kept_by,
    note, clip_rank, candidates, round, order, stars, review, reviewed_at, and ``text``), ``variation`` (round,
    strength, variation, ``text``) and, from ``ratings`` (key -> ``rating_dict``), ``rating``."""
    def walk(n: dict, depth: int = 0) -> None:
        p = n.get("params") or {}
        if n["stage"] == "pick":
            n["pick"] = {k: p.get(k) for k in ("kept_by", "note", "clip_rank", "candidates", "round", "order", "stars",
                                               "review", "reviewed_at")}
            n["pick"]["text"] = pick_text(n["pick"])
        elif n["stage"] == "vary":
            n["variation"] = {k: p.get(k) for k in ("round", "strength", "variation")}
            n["variation"]["text"] = variation_text(n["variation"])
        if ratings and n["key"] in ratings:
            n["rating"] = ratings[n["key"]]
        if depth < 64:
            for q in n["parents"]:
                walk(q, depth + 1)

    walk(node)
    return node


def tree_keys(node: dict) -> set[str]:
    """Every key in a lineage tree."""
    keys, stack = set(), [node]
    while stack:
        n = stack.pop()
        keys.add(n["key"])
        stack.extend(n["parents"])
    return keys


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
        skip = IGNORED | PICK_FIELDS if n.get("stage") == "pick" else IGNORED
        out = {k: v for k, v in (n.get("params") or {}).items() if k not in skip}
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
