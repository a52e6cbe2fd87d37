"""One Prefect task per stage and deliverable (batch granularity: Prefect costs ~10-170 ms a task).

A task builds its stage's request from the brief and the profile, and hands it to the executor
(``flows.executor.run_stage``: keys → reuse check → model call → save → stage row → refs). Tasks return
``Ref``s (key + absolute path), never images or models; they take the run's ``RunContext``.

Tasks retry transient failures with exponential backoff: I/O errors, and CUDA out-of-memory, after which
the stage's batch is halved. Bad input (``BriefError``, ``ValueError``) fails at once.

The tasks that run models (``GPU_TASKS``) get the ``gpu`` tag from the flow when the Prefect server has a
concurrency limit on it (``prefect concurrency-limit create gpu 1``): Prefect asks the server for a slot
before every tagged task, a synchronous round trip (~5 ms idle, 100-200 ms on a busy 2-core machine) that
buys nothing when there is no limit to honour.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from atelier import credentials, metadata, safety
from atelier.backends import costs
from atelier.brief import Campaign, Deliverable, fit_to_area
from atelier.keys import asset_key, derive_seed
from atelier.profiles import ModelSpec
from flows.context import RunContext
from flows.executor import Ref, StageTimer, finish_reused, is_transient, model_call, refs, run_stage, to_compute
from stages import draft as draft_stage
from stages import moodboard as moodboard_stage
from stages import postedit
from stages import refine as refine_stage
from stages import select as select_stage
from stages import vary as vary_stage
from stages.protocol import Input, Item, plan
from store import NewAsset, NewScore, lineage, queries, save


@dataclass(frozen=True)
class BoardRefs:
    board: Ref
    references: tuple[Ref, ...]
    style_refs: tuple[Ref, ...]


def _retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:  # noqa: BLE001
            exc = e
    return exc is not None and is_transient(exc)


RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
               retry_condition_fn=_retry_transient)  # waits ~2, 4, 8 s


def _inputs(rs: list[Ref] | tuple[Ref, ...]) -> tuple[Input, ...]:
    return tuple(Input(r.key, Path(r.path)) for r in rs)


def _deliverable(campaign: Campaign, name: str) -> Deliverable:
    return next(x for x in campaign.brief.deliverables if x.name == name)


def _negative(campaign: Campaign, d: Deliverable) -> str:
    return ", ".join(n for n in (d.negative.strip(), campaign.brief.brand.negative.strip()) if n)


def _seed_of(ctx: RunContext, key: str) -> int:
    """The draft seed at the root of a chain (refine / inpaint reuse it: one seed per lineage)."""
    with ctx.store.sessions() as s:
        node = queries.ancestry(s, key)
        while node["parents"]:
            if "seed" in node["asset"].params:
                return int(node["asset"].params["seed"])
            node = next((p for p in node["parents"] if p["role"] in ("source", "init")), node["parents"][0])
        return int(node["asset"].params.get("seed", 0))


def _budget(ctx: RunContext, campaign: Campaign, model: ModelSpec) -> costs.Budget | None:
    """The brief's ``budget`` for a stage calling a remote ``model``, less what this run has already spent:
    the dollars of the remote assets it computed (in any pass of it, resumed or not; reused assets cost $0).
    The limit is per run: ``atelier run`` again after a budget stop pays only for what is still missing.
    Read from the store when the stage starts, so a Dask run's deliverables in flight at once may each
    reserve against the same remainder (their sum can pass the limit by one stage's estimate)."""
    if campaign.brief.budget is None or model.kind != "remote":
        return None
    with ctx.store.sessions() as s:
        rows = costs.cost_rows(queries.run_assets(s, ctx.run_id))
    return costs.Budget(campaign.brief.budget.usd, costs.summarize(rows)["usd"])


# ---------------------------------------------------------------------------------------- mood board
def _reference_asset(campaign: Campaign, path: Path) -> NewAsset:
    """A brand reference, identified by its bytes (read again: ``BriefError`` if changed since the brief was checked)."""
    data, checked = campaign.read_image(path), campaign.image(path)
    sha, size = checked.sha256, checked.size
    return NewAsset(key=asset_key("reference", 1, {"sha256": sha}, [], None), stage="reference", kind="image",
                    campaign=campaign.brief.campaign, deliverable=None, data=data, suffix=path.suffix.lower(),
                    width=size[0], height=size[1], params={"source": str(path.relative_to(campaign.root)), "sha256": sha})


@task(name="mood-board", cache_policy=NO_CACHE, **RETRIES)
def moodboard_task(ctx: RunContext, campaign: Campaign) -> BoardRefs:
    """Ingest the brand references and embed them into a mood board."""
    stage = moodboard_stage.STAGE
    timer = StageTimer(ctx, None, stage.name, len(campaign.style_refs))
    # 1. The references, stored by their bytes
    ref_assets = [_reference_asset(campaign, p) for p in campaign.style_refs]
    ref_keys = [a.key for a in ref_assets]
    new_refs = to_compute(ctx, "reference", ref_keys)
    if new_refs:
        save(ctx.store, ctx.run_id, [a for a in ref_assets if a.key in new_refs])
    ref_refs = refs(ctx.store, ref_keys)
    # 2. The board: one item, keyed by the request it is built from
    req = moodboard_stage.MoodboardRequest(max_style_refs=campaign.brief.max_style_refs,
                                           references=_inputs(ref_refs), clip=ctx.prof.clip)
    [item] = plan(stage, req, ctx.models.identity)
    board_new = bool(to_compute(ctx, stage.name, [item.key]))
    if board_new:
        t0 = time.perf_counter()
        board = model_call(ctx, None, stage, req)
        params = {**item.recipe, "centrality": dict(zip(ref_keys, board.centrality)),
                  "style_refs": [ref_keys[i] for i in board.style_refs]}
        save(ctx.store, ctx.run_id, [NewAsset(
            key=item.key, stage=stage.name, kind=stage.kind, campaign=campaign.brief.campaign, deliverable=None,
            data=board.to_bytes(), suffix=".npz", params=params, model=item.model,
            seconds=time.perf_counter() - t0, parents=item.parents)])
    lineage.mark_reused(ctx.store, ctx.run_id, [k for k in ref_keys if k not in new_refs] + ([] if board_new else [item.key]))
    computed = len(new_refs) + board_new
    timer.done(computed, len(ref_keys) + 1 - computed)
    [board_ref] = refs(ctx.store, [item.key])
    style_order = moodboard_stage.Moodboard.from_file(Path(board_ref.path)).style_refs
    return BoardRefs(board_ref, tuple(ref_refs), tuple(ref_refs[i] for i in style_order))


# -------------------------------------------------------------------------------------------- drafts
@task(name="draft-batch", task_run_name="{name}/draft", cache_policy=NO_CACHE, **RETRIES)
def draft_task(ctx: RunContext, campaign: Campaign, name: str) -> list[Ref]:
    """Cheap drafts: a seed sweep of ``drafts`` images for one deliverable."""
    d, s = _deliverable(campaign, name), ctx.prof.draft
    w, h = fit_to_area(d.aspect_ratio, s.pixels, s.multiple)
    req = draft_stage.DraftRequest(
        prompt=d.prompt, negative=_negative(campaign, d), width=w, height=h, steps=s.steps, guidance=s.guidance,
        scheduler=s.scheduler, model=ctx.prof.draft_model,
        seeds=tuple(derive_seed(campaign.brief.seed, d.name, "draft", i) for i in range(d.drafts)),
        indices=tuple(range(d.drafts)), batch_size=s.batch_size, budget=_budget(ctx, campaign, ctx.prof.draft_model))
    return run_stage(ctx, draft_stage.STAGE, req, campaign.brief.campaign, name)


# ----------------------------------------------------------------------------------------- selection
@task(name="select-drafts", task_run_name="{name}/select r{round_no}", cache_policy=NO_CACHE, **RETRIES)
def select_task(ctx: RunContext, campaign: Campaign, name: str, round_no: int, drafts: list[Ref] | None,
                board: BoardRefs) -> list[Ref] | None:
    """Score round ``round_no``'s candidates with CLIP and keep the top ``keep`` (diversity-aware); where the
    brief asks for review, a person's decision at this selection decides instead (``None``: none yet; the
    deliverable stops here and the run awaits review).

    The decision is keyed by its request (prompt, keep, weights, every candidate, the board, CLIP); each kept
    draft is an asset of its own (same bytes as the draft) keyed by the decision and its rank."""
    if drafts is None:  # an earlier gate of this deliverable awaits review
        return None
    d, stage = _deliverable(campaign, name), select_stage.STAGE
    rounds = campaign.brief.rounds_of(d)
    # The safety gate first: a flagged draft is never kept, by CLIP or by a person
    mode, threshold = _safety_setting(ctx, campaign)
    excluded: tuple[int, ...] = ()
    if mode != "off":
        nsfw = _safety_scores(ctx, campaign, name, drafts)
        excluded = tuple(i for i, r in enumerate(drafts) if safety.flagged(nsfw[r.key], threshold, mode))
        lineage.record_safety(ctx.store, ctx.run_id, name, [
            {"key": r.key, "of": "draft", "nsfw": nsfw[r.key], "threshold": threshold, "mode": mode,
             "decision": "excluded" if i in excluded else "pass"} for i, r in enumerate(drafts)])
        if excluded:
            ctx.progress.note(f"{name} · round {round_no}: safety gate flagged {len(excluded)} of {len(drafts)} "
                              f"drafts (open_nsfw >= {threshold}); they are not selected")
    keep = min(d.keep if round_no == 0 else rounds[round_no - 1].keep, len(drafts) - len(excluded))
    req = select_stage.SelectRequest(prompt=d.prompt_at(rounds, round_no), keep=max(keep, 1),
                                     weights=ctx.prof.selection_weights, drafts=_inputs(drafts), excluded=excluded,
                                     moodboard=_inputs([board.board])[0], clip=ctx.prof.clip)
    select_stage.check_inputs(req)  # all drafts flagged: a clear error, before any model runs
    [decision] = plan(stage, req, ctx.models.identity)
    clip_kept = _clip_select(ctx, campaign, name, round_no, req, decision, drafts)
    if not campaign.brief.reviewed_at(d, round_no, ctx.spec.review):
        return clip_kept
    return _gate(ctx, campaign, name, round_no, decision.key, [r for i, r in enumerate(drafts) if i not in excluded])


# --------------------------------------------------------------------------------------- safety gate
def _safety_setting(ctx: RunContext, campaign: Campaign) -> tuple[str, float]:
    """The brief's safety mode and threshold (the profile's threshold unless the brief gives one)."""
    s = campaign.brief.safety
    return s.mode, ctx.prof.safety_threshold if s.threshold is None else s.threshold


def _safety_scores(ctx: RunContext, campaign: Campaign, name: str, images: list[Ref]) -> dict[str, float]:
    """open_nsfw's score of each image, by key (``atelier.safety``). Each score is a ``safety`` check asset
    (a small JSON file; parent: the image; keyed by it and the classifier), computed once and then reused."""
    spec = ctx.prof.safety_model
    model = ctx.models.identity(spec)
    keys = {r.key: asset_key("safety", safety.CHECK_VERSION, {}, [(r.key, "source")], model) for r in images}
    timer = StageTimer(ctx, name, "safety", len(images))
    missing = to_compute(ctx, "safety", list(keys.values()))
    todo = [r for r in images if keys[r.key] in missing]
    if todo:
        t0 = time.perf_counter()
        scores = safety.score(ctx.models.safety_classifier(spec), [Image.open(r.path).convert("RGB") for r in todo])
        per = (time.perf_counter() - t0) / len(todo)
        save(ctx.store, ctx.run_id, [NewAsset(
            key=keys[r.key], stage="safety", kind="check", campaign=campaign.brief.campaign, deliverable=name,
            data=json.dumps({"image": r.key, "nsfw": sc, "classifier": spec.name}).encode(), suffix=".json",
            params={"nsfw": sc, "classifier": spec.name, "image": r.key}, model=model, seconds=per, parents=((r.key, "source"),))
            for r, sc in zip(todo, scores)])
    lineage.mark_reused(ctx.store, ctx.run_id, [k for k in keys.values() if k not in missing])
    timer.done(len(todo), len(images) - len(todo))
    with ctx.store.sessions() as s:
        rows = queries.existing(s, ctx.store.files, keys.values())
    return {image: float(rows[check].params["nsfw"]) for image, check in keys.items()}


def _safety_gate_finals(ctx: RunContext, campaign: Campaign, name: str, finals: list[Ref]) -> set[str]:
    """Score the finals and record each decision (pass / flag / block) with the run; returns the blocked keys."""
    mode, threshold = _safety_setting(ctx, campaign)
    if mode == "off" or not finals:
        return set()
    nsfw = _safety_scores(ctx, campaign, name, finals)
    decisions = [{"key": r.key, "of": "final", "nsfw": nsfw[r.key], "threshold": threshold, "mode": mode,
                  "decision": safety.decide(nsfw[r.key], threshold, mode)} for r in finals]
    lineage.record_safety(ctx.store, ctx.run_id, name, decisions)
    for x in decisions:
        if x["decision"] != "pass":
            ctx.progress.note(f"{name}: final {x['key']} {'blocked' if x['decision'] == 'block' else 'flagged'} by the "
                              f"safety gate: open_nsfw {x['nsfw']:.4f} >= threshold {threshold}")
    return {x["key"] for x in decisions if x["decision"] == "block"}


def _clip_select(ctx: RunContext, campaign: Campaign, name: str, round_no: int, req: select_stage.SelectRequest,
                 decision: Item, drafts: list[Ref]) -> list[Ref]:
    stage = select_stage.STAGE
    timer = StageTimer(ctx, name, "select", len(drafts))

    def kept_key(draft_key: str, rank: int) -> str:
        return asset_key("select", stage.version, {"decision": decision.key, "rank": rank}, [(draft_key, "source")],
                         None)

    with ctx.store.sessions() as s:
        prior = lineage.scores_for(s, decision.key)
    if prior and not ctx.forced("select"):
        keys = [kept_key(sc.draft_key, sc.rank) for sc in sorted((sc for sc in prior if sc.kept), key=lambda x: x.rank)]
        if not to_compute(ctx, "select", keys):
            return finish_reused(ctx, timer, keys)
    t0 = time.perf_counter()
    sel = model_call(ctx, name, stage, req)
    seconds = time.perf_counter() - t0
    scores = [NewScore(decision.key, drafts[sc.index].key, sc.prompt_score, sc.moodboard_score, sc.diversity_penalty,
                       sc.total, sc.rank, sc.rank is not None) for sc in sel.scores]
    assets = []
    for rank, i in enumerate(sel.kept, start=1):
        sc = sel.scores[i]
        params = {**decision.recipe, "decision": decision.key, "rank": rank, "round": round_no,
                  "prompt_score": sc.prompt_score, "moodboard_score": sc.moodboard_score,
                  "diversity_penalty": sc.diversity_penalty, "total": sc.total}
        with Image.open(drafts[i].path) as im:
            size = im.size
        # Same bytes as the draft (one file on disk); its own row carries the decision.
        assets.append(NewAsset(key=kept_key(drafts[i].key, rank), stage="select", kind="image",
                               campaign=campaign.brief.campaign, deliverable=name, data=Path(drafts[i].path).read_bytes(),
                               suffix=".png", params=params, model=decision.model, width=size[0], height=size[1],
                               seconds=seconds / len(sel.kept), parents=((drafts[i].key, "source"),)))
    save(ctx.store, ctx.run_id, assets, scores)
    timer.done(len(assets), 0)
    return refs(ctx.store, [a.key for a in assets])


PICK_VERSION = 1


def pick_key(decision: str, candidate: str) -> str:
    """A person kept ``candidate`` at the gate ``decision``: keyed by the two alone, so changing one pick
    recomputes only that pick's chain (the others keep their keys). Who, when and why are its params."""
    return asset_key("pick", PICK_VERSION, {"gate": decision}, [(candidate, "source")], None)


def _gate(ctx: RunContext, campaign: Campaign, name: str, round_no: int, decision: str,
          candidates: list[Ref]) -> list[Ref] | None:
    """The review gate at ``decision``: the latest review's picks (assets of their own), or None when no
    person has decided yet (the gate is recorded; the run ends "awaiting review")."""
    lineage.record_gate(ctx.store, ctx.run_id, decision, name, round_no, [c.key for c in candidates])
    with ctx.store.sessions() as s:
        review = lineage.latest_review(s, decision)
        scores = {sc.draft_key: sc for sc in lineage.scores_for(s, decision)}
    if review is None:
        ctx.progress.note(f"{name} · round {round_no}: awaiting a person's decision")
        return None
    timer = StageTimer(ctx, name, "pick", len(review.kept))
    clip_rank = queries.clip_ranks(scores.values())
    keys = [pick_key(decision, k) for k in review.kept]
    missing = to_compute(ctx, "pick", keys)
    paths = {c.key: c.path for c in candidates}
    assets = []
    for n, (cand, key) in enumerate(zip(review.kept, keys), start=1):
        if key not in missing:
            continue
        if cand not in paths:
            raise ValueError(f"review {review.id}: {cand} is not a candidate of gate {decision}")
        with Image.open(paths[cand]) as im:
            size = im.size
        params = {"gate": decision, "round": round_no, "kept_by": review.by, "note": review.note, "review": review.id,
                  "reviewed_at": review.created_at.isoformat(timespec="seconds"), "order": n,
                  "clip_rank": clip_rank.get(cand), "candidates": len(candidates),
                  "stars": review.stars.get(cand)}
        assets.append(NewAsset(key=key, stage="pick", kind="image", campaign=campaign.brief.campaign, deliverable=name,
                               data=Path(paths[cand]).read_bytes(), suffix=".png", params=params, width=size[0],
                               height=size[1], parents=((cand, "source"),)))
    if assets:
        save(ctx.store, ctx.run_id, assets)
    lineage.mark_reused(ctx.store, ctx.run_id, [k for k in keys if k not in missing])
    timer.done(len(assets), len(keys) - len(assets))
    return refs(ctx.store, keys)


# ------------------------------------------------------------------------------------------- rounds
@task(name="vary-batch", task_run_name="{name}/vary r{round_no}", cache_policy=NO_CACHE, **RETRIES)
def vary_task(ctx: RunContext, campaign: Campaign, name: str, round_no: int, kept: list[Ref] | None) -> list[Ref] | None:
    """Round ``round_no``: ``drafts`` img2img variations of each image the round before kept."""
    if kept is None:
        return None
    d, s = _deliverable(campaign, name), ctx.prof.draft
    rounds = campaign.brief.rounds_of(d)
    r = rounds[round_no - 1]
    w, h = fit_to_area(d.aspect_ratio, s.pixels, s.multiple)
    inits = [k for k in kept for _ in range(r.drafts)]
    # Seeds follow the image varied (its key), not its position: changing one pick leaves the others' keys.
    seeds = tuple(derive_seed(campaign.brief.seed, d.name, "vary", round_no, k.key, j)
                  for k in kept for j in range(r.drafts))
    req = vary_stage.VaryRequest(
        prompt=d.prompt_at(rounds, round_no), negative=_negative(campaign, d), width=w, height=h,
        steps=max(s.steps, math.ceil(1 / r.strength)), guidance=s.guidance, strength=r.strength,
        scheduler=s.scheduler, round=round_no, model=ctx.prof.draft_model, inits=_inputs(inits), seeds=seeds,
        variations=tuple(j for _ in kept for j in range(r.drafts)), batch_size=s.batch_size,
        budget=_budget(ctx, campaign, ctx.prof.draft_model))
    return run_stage(ctx, vary_stage.STAGE, req, campaign.brief.campaign, name)


# -------------------------------------------------------------------------------------------- refine
@task(name="refine-batch", task_run_name="{name}/refine", cache_policy=NO_CACHE, **RETRIES)
def refine_task(ctx: RunContext, campaign: Campaign, name: str, kept: list[Ref] | None,
                board: BoardRefs) -> list[Ref] | None:
    """Full-quality img2img regeneration of the last round's picks, styled by IP-Adapter with the style refs."""
    if kept is None:
        return None
    d, prof, s = _deliverable(campaign, name), ctx.prof, ctx.prof.refine
    w, h = fit_to_area(d.aspect_ratio, s.pixels, s.multiple)
    rounds = campaign.brief.rounds_of(d)
    req = refine_stage.RefineRequest(
        prompt=d.prompt_at(rounds, len(rounds)), negative=_negative(campaign, d), width=w, height=h, steps=s.steps,
        guidance=s.guidance, strength=s.strength, scheduler=s.scheduler, ip_adapter_scale=prof.ip_adapter_scale,
        model=prof.refine_model, ip_adapter=prof.ip_adapter, style_refs=_inputs(board.style_refs), inits=_inputs(kept),
        seeds=tuple(_seed_of(ctx, r.key) for r in kept), batch_size=s.batch_size,
        budget=_budget(ctx, campaign, prof.refine_model))
    return run_stage(ctx, refine_stage.STAGE, req, campaign.brief.campaign, name)


# ----------------------------------------------------------------------------------------- post-edit
def _masks(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref]) -> list[Ref]:
    """The mask of each source: the brief's mask file, a drawn region (at the sources' size; one for all), or
    the faces found in each source (one each). Masks are assets: stored, reused and in lineage."""
    spec, camp = _deliverable(campaign, name).post.inpaint, campaign.brief.campaign
    if spec.faces:
        req = postedit.FaceMaskRequest(detector=ctx.prof.face_detector, sources=_inputs(sources))
        return run_stage(ctx, postedit.MASK_FACES, req, camp, name)
    mask_file = campaign.mask_for(name)
    if mask_file is not None:
        campaign.read_image(mask_file)  # BriefError if deleted or changed since the brief was checked
        req = postedit.FileMaskRequest(source=str(mask_file.relative_to(campaign.root)),
                                       sha256=campaign.image(mask_file).sha256, file=mask_file)
        [mask] = run_stage(ctx, postedit.MASK_FILE, req, camp, name)
    else:
        with Image.open(sources[0].path) as im:
            size = im.size
        req = postedit.RegionMaskRequest(region=tuple(spec.region), shape=spec.shape, width=size[0], height=size[1])
        [mask] = run_stage(ctx, postedit.MASK_REGION, req, camp, name)
    return [mask] * len(sources)


@task(name="inpaint-batch", task_run_name="{name}/inpaint", cache_policy=NO_CACHE, **RETRIES)
def inpaint_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref] | None,
                 board: BoardRefs) -> list[Ref] | None:
    """Repaint the brief's region / mask in every image; the mask itself is an asset."""
    if sources is None:
        return None
    d, prof, s = _deliverable(campaign, name), ctx.prof, ctx.prof.inpaint
    model = prof.inpaint_model or prof.refine_model
    req = postedit.InpaintRequest(
        prompt=d.post.inpaint.prompt, negative=_negative(campaign, d), steps=s.steps, guidance=s.guidance,
        strength=s.strength, scheduler=s.scheduler, ip_adapter_scale=prof.ip_adapter_scale, multiple=s.multiple,
        model=model, ip_adapter=prof.ip_adapter, style_refs=_inputs(board.style_refs),
        sources=_inputs(sources), masks=_inputs(_masks(ctx, campaign, name, sources)),
        seeds=tuple(_seed_of(ctx, r.key) for r in sources), batch_size=s.batch_size,
        budget=_budget(ctx, campaign, model))
    return run_stage(ctx, postedit.INPAINT, req, campaign.brief.campaign, name)


@task(name="face-restore-batch", task_run_name="{name}/face-restore", cache_policy=NO_CACHE, **RETRIES)
def face_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref] | None) -> list[Ref] | None:
    """Detect faces (dlib CNN) and restore each with GFPGAN, keeping a restored face only if it is still the
    same person (dlib ResNet identity distance); boxes, distances and decisions go into lineage."""
    if sources is None:
        return None
    post = _deliverable(campaign, name).post
    threshold = post.identity_threshold or ctx.prof.identity_threshold
    req = postedit.FaceRequest(face_size=ctx.prof.face_size, face=ctx.prof.face, detector=ctx.prof.face_detector,
                               identity=ctx.prof.face_identity, identity_threshold=threshold,
                               sources=_inputs(sources))
    return run_stage(ctx, postedit.FACE_RESTORE, req, campaign.brief.campaign, name)


@task(name="upscale-batch", task_run_name="{name}/upscale", cache_policy=NO_CACHE, **RETRIES)
def upscale_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref] | None) -> list[Ref] | None:
    """Real-ESRGAN x4 (tiled), then a Lanczos cover-fit to the delivered size."""
    if sources is None:
        return None
    w, h = _deliverable(campaign, name).final_size()
    req = postedit.UpscaleRequest(width=w, height=h, tile=ctx.prof.upscale_tile, model=ctx.prof.upscale,
                                  sources=_inputs(sources))
    return run_stage(ctx, postedit.UPSCALE, req, campaign.brief.campaign, name)


def _withdraw(ctx: RunContext, target: Path) -> None:
    """A blocked final's place in outputs/: what an earlier run delivered there goes (with its sidecar), so the
    folder never shows a final this run did not deliver. The asset itself stays in the store."""
    gone = [p for p in (target, metadata.sidecar_path(target)) if p.exists()]
    for p in gone:
        p.unlink()
    if gone:
        ctx.progress.note(f"removed {target.name} from {target.parent}: an earlier run delivered it, and this "
                          f"run's final at that place is blocked")


GPU_TAG = "gpu"
GPU_TASKS = (moodboard_task, draft_task, vary_task, select_task, refine_task, inpaint_task, face_task, upscale_task)


@task(name="export-finals", task_run_name="{name}/export", cache_policy=NO_CACHE, **RETRIES)
def export_task(ctx: RunContext, campaign: Campaign, name: str, finals: list[Ref] | None) -> list[str] | None:
    """Deliver each final as ``<home>/outputs/<campaign>/<deliverable>-<n>.png`` with its lineage sidecar
    (``<deliverable>-<n>.png.json``), and mark it final.

    The delivered file is a C2PA-signed copy of the asset (``atelier.credentials``): the asset file in
    ``assets/`` stays content-addressed and untouched, so keys and reuse do not depend on signing
    (each signature is new: a time, a random manifest id). An unchanged final already delivered is not signed
    again (``credentials.sign_file_once``). With ``ATELIER_C2PA=off`` it is a hard link.
    ``None``: the deliverable awaits review; there is nothing to deliver yet.
    """
    if finals is None:
        return None
    t0 = time.perf_counter()
    blocked = _safety_gate_finals(ctx, campaign, name, finals)  # not exported; the run names them and exits 3
    out_dir = ctx.home / "outputs" / campaign.brief.campaign
    out_dir.mkdir(parents=True, exist_ok=True)
    signing = credentials.signing_config(ctx.home)
    with ctx.store.sessions() as s:
        docs = [metadata.doc_from_store(s, ref.key) for ref in finals]  # the document the PNG carries
    paths = []
    for n, (ref, doc) in enumerate(zip(finals, docs), start=1):
        target = out_dir / f"{name}-{n}{Path(ref.path).suffix}"
        if ref.key in blocked:
            _withdraw(ctx, target)
            continue
        if signing is not None:
            with ctx.store.sessions() as s:
                manifest, ingredients = credentials.final_credentials(s, ctx.store.files.path, ref.key, target.name)
            credentials.sign_file_once(Path(ref.path), target, signing, manifest, ingredients,
                                       ctx.home / "cache" / "c2pa-signed")
        elif not (target.exists() and os.path.samefile(target, ref.path)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(ref.path, tmp)  # no copy of a 4K file; the asset file is never modified
            except OSError:
                shutil.copyfile(ref.path, tmp)
            os.replace(tmp, target)
        metadata.write_sidecar(target, doc)
        lineage.mark_final(ctx.store, ctx.run_id, ref.key, str(target))
        paths.append(str(target))
    ctx.phases["export"] += time.perf_counter() - t0
    return paths
