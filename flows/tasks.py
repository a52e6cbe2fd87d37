"""One Prefect task per stage and deliverable (batch granularity: Prefect costs ~10-170 ms a task).

Every task follows the same shape:
1. compute the content keys of the assets it would produce (recipe hash, see ``atelier.keys``);
2. if all of them are already stored with their files, reuse them (no model call);
3. otherwise run the stage function on what is missing and persist through ``store.save``;
4. record the stage's wall time and computed / reused counts.
Tasks return ``Ref``s (key + absolute path), never images or models.

Model work goes through ``_model_call`` (counted in ``MODEL_CALLS``: an unchanged re-run makes none).
Tasks retry transient failures with exponential backoff: I/O errors, and CUDA out-of-memory, after which
the stage's batch is halved. Bad input (``BriefError``, ``ValueError``) fails at once.

The tasks that run models (``GPU_TASKS``) get the ``gpu`` tag from the flow when the Prefect server has a
concurrency limit on it (``prefect concurrency-limit create gpu 1``): Prefect asks the server for a slot
before every tagged task, a synchronous round trip (~5 ms idle, 100-200 ms on a busy 2-core machine) that
buys nothing when there is no limit to honour.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from atelier import contact_sheet, credentials, metadata, progress
from atelier.brief import Campaign, Deliverable, Stages, apply_overrides, fit_to_area
from atelier.errors import BriefError
from atelier.keys import asset_key, derive_seed
from atelier.registry import Profile, device_used, identity
from flows import STAGES
from stages import draft as draft_stage
from stages import moodboard as moodboard_stage
from stages import postedit
from stages import refine as refine_stage
from stages import select as select_stage
from stages.common import png_bytes
from store import NewAsset, NewScore, Store, open_store, save
from store import lineage, queries


@dataclass(frozen=True)
class RunContext:
    run_id: str
    home: str
    store_url: str | None
    profile: str
    stages: Stages = Stages()  # the brief's per-stage overrides of the profile
    brief_root: str = "."
    assets_url: str | None = None  # fsspec URL of the asset files; None: $ATELIER_ASSETS, else <home>/assets
    force: str | None = None  # recompute this stage and every later one even where the assets are stored

    def forced(self, stage: str) -> bool:
        """Whether ``--force`` makes ``stage`` recompute its stored assets."""
        return self.force is not None and STAGES.index(stage) >= STAGES.index(self.force)

    @property
    def store(self) -> Store:
        return open_store(Path(self.home), self.store_url, self.assets_url)

    @property
    def models_dir(self) -> Path:
        return Path(self.home) / "models"

    @property
    def prof(self) -> Profile:
        """The profile as this brief runs it: the registry's, with the brief's stage overrides applied."""
        return apply_overrides(self.profile, self.stages, Path(self.brief_root))


@dataclass(frozen=True)
class Ref:
    key: str
    path: str


@dataclass(frozen=True)
class BoardRefs:
    board: Ref
    references: tuple[Ref, ...]
    style_refs: tuple[Ref, ...]


def _refs(store: Store, keys: list[str]) -> list[Ref]:
    with store.sessions() as s:
        found = queries.existing(s, store.files, keys)
    return [Ref(k, str(store.files.path(found[k].path))) for k in keys]


def _missing(store: Store, keys: list[str]) -> set[str]:
    with store.sessions() as s:
        return set(keys) - set(queries.existing(s, store.files, keys))


def _to_compute(ctx: RunContext, stage: str, keys: list[str]) -> set[str]:
    """The keys ``stage`` must compute: those not stored (with their file), or all of them under ``--force``."""
    return set(keys) if ctx.forced(stage) else _missing(ctx.store, keys)


# ------------------------------------------------------------------------- model calls and retries
@dataclass
class ModelCalls:
    """Stage entry functions (each loads its models once per process and runs them) called by this process."""
    count: int = 0
    seconds: float = 0.0
    by_stage: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.count, self.seconds, self.by_stage = 0, 0.0, Counter()


MODEL_CALLS = ModelCalls()
_calls_lock = threading.Lock()
_batch_caps: dict[tuple[str, str | None, str], int] = {}  # (run, deliverable, stage) -> batch after CUDA OOM


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: CUDA out-of-memory (with a smaller batch) and I/O errors. Never bad input, and
    never a file that is simply not there (a missing reference or weight file stays missing)."""
    if isinstance(exc, (BriefError, ValueError)):
        return False
    if _is_oom(exc):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                            NotADirectoryError))


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


def _batch(ctx: RunContext, deliverable: str | None, stage: str, default: int) -> int:
    """The stage's batch size: the profile's, halved after each CUDA out-of-memory of this run's stage."""
    return _batch_caps.get((ctx.run_id, deliverable, stage), default)


def _model_call(ctx: RunContext, deliverable: str | None, stage: str, fn: Callable[..., Any], request: Any,
                on_progress=None, batch: int | None = None):  # noqa: ANN001
    """Run a stage entry function, counting and timing it; on CUDA OOM halve the batch for the retry."""
    t0 = time.perf_counter()
    try:
        return fn(request) if on_progress is None else fn(request, on_progress=on_progress)
    except Exception as exc:
        if _is_oom(exc):
            if batch is not None:
                _batch_caps[(ctx.run_id, deliverable, stage)] = max(1, batch // 2)
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        raise
    finally:
        with _calls_lock:
            MODEL_CALLS.count += 1
            MODEL_CALLS.seconds += time.perf_counter() - t0
            MODEL_CALLS.by_stage[stage] += 1


def _image_asset(key: str, stage: str, campaign: str, deliverable: str | None, image: Image.Image, params: dict,
                 model: dict | None, seconds: float, parents: tuple[tuple[str, str], ...], kind: str = "image",
                 store: Store | None = None) -> NewAsset:
    """An image asset whose PNG carries its recipe (``atelier.metadata``): the lineage document in an
    ``atelier`` text chunk (this recipe and every ancestor's, read from the store) and the A1111
    ``parameters`` chunk. ``store`` defaults to the running task's ``ctx.store``."""
    chain = {}
    if parents:  # ancestors are committed before a child is computed
        with (store or _task_store()).sessions() as s:
            chain = metadata.ancestors(s, [k for k, _ in parents])
    own = metadata.record(stage, kind, campaign, deliverable, image.width, image.height, params, model, parents)
    doc = metadata.lineage_doc(key, own, chain)
    return NewAsset(key=key, stage=stage, kind=kind, campaign=campaign, deliverable=deliverable,
                    data=png_bytes(image, metadata.png_text(doc), compress_level=3), suffix=".png", params=params,
                    model=model, width=image.width, height=image.height, seconds=seconds, parents=parents)


def _task_store() -> Store:
    """The store of the running task's ``ctx`` argument (every task here takes one)."""
    from prefect.runtime import task_run

    ctx = task_run.parameters.get("ctx")
    if not isinstance(ctx, RunContext):
        raise RuntimeError("embedding lineage needs the store: pass store=, or call inside a task taking ctx")
    return ctx.store


class _Stage:
    """Times one stage execution and records it with its computed / reused counts."""

    def __init__(self, ctx: RunContext, deliverable: str | None, stage: str, total: int) -> None:
        self.ctx, self.deliverable, self.stage = ctx, deliverable, stage
        self.label = f"{deliverable or 'campaign'} · {stage}"
        self.on_progress = progress.current().begin(self.label, total)
        self.t0 = time.perf_counter()

    def done(self, computed: int, reused: int) -> float:
        seconds = time.perf_counter() - self.t0
        lineage.record_stage(self.ctx.store, self.ctx.run_id, self.deliverable, self.stage, seconds, computed, reused,
                             device_used())
        progress.current().end(self.label, f"{computed} computed, {reused} reused, {seconds:.1f}s")
        return seconds


def _finish_reused(ctx: RunContext, st: _Stage, keys: list[str]) -> list[Ref]:
    lineage.mark_reused(ctx.store, ctx.run_id, keys)
    st.done(0, len(keys))
    return _refs(ctx.store, keys)


# ---------------------------------------------------------------------------------------- mood board
@task(name="mood-board", cache_policy=NO_CACHE, **RETRIES)
def moodboard_task(ctx: RunContext, campaign: Campaign) -> BoardRefs:
    """Ingest the brand references and embed them into a mood board."""
    store, prof, brief = ctx.store, ctx.prof, campaign.brief
    st = _Stage(ctx, None, "moodboard", len(campaign.style_refs))
    # References are identified by their bytes.
    ref_assets = []
    for p in campaign.style_refs:
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = asset_key("reference", 1, {"sha256": sha}, [], None)
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
        ref_assets.append(NewAsset(key=key, stage="reference", kind="image", campaign=brief.campaign, deliverable=None,
                                   data=data, suffix=p.suffix.lower(), width=size[0], height=size[1],
                                   params={"source": str(p.relative_to(campaign.root)), "sha256": sha}))
    ref_keys = [a.key for a in ref_assets]
    clip_id = identity(prof.clip, ctx.models_dir)
    board_key = asset_key("moodboard", moodboard_stage.STAGE_VERSION, {"max_style_refs": brief.max_style_refs},
                          [(k, "source") for k in ref_keys], clip_id)
    missing = _missing(store, ref_keys + [board_key]) | ({board_key} if ctx.forced("moodboard") else set())
    computed = 0
    if missing - {board_key}:
        save(store, ctx.run_id, [a for a in ref_assets if a.key in missing])
        computed += len(missing - {board_key})
    if board_key in missing:
        t0 = time.perf_counter()
        board = _model_call(ctx, None, "moodboard", moodboard_stage.build_moodboard, moodboard_stage.MoodboardRequest(
            references=campaign.style_refs, clip=prof.clip, models_dir=ctx.models_dir,
            max_style_refs=brief.max_style_refs))
        params = {"max_style_refs": brief.max_style_refs,
                  "centrality": dict(zip(ref_keys, board.centrality)),
                  "style_refs": [ref_keys[i] for i in board.style_refs]}
        save(store, ctx.run_id, [NewAsset(
            key=board_key, stage="moodboard", kind="embedding", campaign=brief.campaign, deliverable=None,
            data=board.to_bytes(), suffix=".npz", params=params, model=clip_id, seconds=time.perf_counter() - t0,
            parents=tuple((k, "source") for k in ref_keys))])
        computed += 1
    lineage.mark_reused(store, ctx.run_id, [k for k in ref_keys + [board_key] if k not in missing])
    st.done(computed, len(ref_keys) + 1 - computed)
    refs = _refs(store, ref_keys + [board_key])
    board_ref = refs[-1]
    style_order = moodboard_stage.Moodboard.from_file(Path(board_ref.path)).style_refs
    return BoardRefs(board_ref, tuple(refs[:-1]), tuple(refs[i] for i in style_order))


# -------------------------------------------------------------------------------------------- drafts
def _negative(campaign: Campaign, d: Deliverable) -> str:
    return ", ".join(n for n in (d.negative.strip(), campaign.brief.brand.negative.strip()) if n)


def _draft_recipe(ctx: RunContext, campaign: Campaign, d: Deliverable) -> tuple[list[dict], dict]:
    prof = ctx.prof
    w, h = fit_to_area(d.aspect_ratio, prof.draft.pixels, prof.draft.multiple)
    base = {"prompt": d.prompt, "negative": _negative(campaign, d), "width": w, "height": h,
            "steps": prof.draft.steps, "guidance": prof.draft.guidance, "scheduler": prof.draft.scheduler}
    seeds = [derive_seed(campaign.brief.seed, d.name, "draft", i) for i in range(d.drafts)]
    return [{**base, "seed": s, "index": i} for i, s in enumerate(seeds)], identity(prof.draft_model, ctx.models_dir)


@task(name="draft-batch", task_run_name="{name}/draft", cache_policy=NO_CACHE, **RETRIES)
def draft_task(ctx: RunContext, campaign: Campaign, name: str) -> list[Ref]:
    """Cheap drafts: a seed sweep of ``drafts`` images for one deliverable."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    prof, store = ctx.prof, ctx.store
    recipes, model_id = _draft_recipe(ctx, campaign, d)
    keys = [asset_key("draft", draft_stage.STAGE_VERSION, r, [], model_id) for r in recipes]
    st = _Stage(ctx, name, "draft", len(keys))
    missing = _to_compute(ctx, "draft", keys)
    if not missing:
        return _finish_reused(ctx, st, keys)
    todo = [(k, r) for k, r in zip(keys, recipes) if k in missing]
    t0 = time.perf_counter()
    batch = _batch(ctx, name, "draft", prof.draft.batch_size)
    drafts = _model_call(ctx, name, "draft", draft_stage.generate_drafts, draft_stage.DraftRequest(
        prompt=d.prompt, negative=todo[0][1]["negative"], seeds=tuple(r["seed"] for _, r in todo),
        width=todo[0][1]["width"], height=todo[0][1]["height"], steps=prof.draft.steps, guidance=prof.draft.guidance,
        scheduler=prof.draft.scheduler, model=prof.draft_model, models_dir=ctx.models_dir,
        batch_size=batch), on_progress=st.on_progress, batch=batch)
    per = (time.perf_counter() - t0) / len(drafts)
    save(store, ctx.run_id, [_image_asset(k, "draft", campaign.brief.campaign, name, dr.image, r, model_id, per, ())
                             for (k, r), dr in zip(todo, drafts)])
    lineage.mark_reused(store, ctx.run_id, [k for k in keys if k not in missing])
    st.done(len(todo), len(keys) - len(todo))
    return _refs(store, keys)


# ----------------------------------------------------------------------------------------- selection
@task(name="select-drafts", task_run_name="{name}/select", cache_policy=NO_CACHE, **RETRIES)
def select_task(ctx: RunContext, campaign: Campaign, name: str, drafts: list[Ref], board: BoardRefs) -> list[Ref]:
    """Score every draft with CLIP and keep the top ``keep`` (diversity-aware)."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    prof, store = ctx.prof, ctx.store
    clip_id = identity(prof.clip, ctx.models_dir)
    recipe = {"prompt": d.prompt, "keep": d.keep, "weights": list(prof.selection_weights)}
    decision = asset_key("select-decision", select_stage.STAGE_VERSION, recipe,
                         [(r.key, "source") for r in drafts] + [(board.board.key, "moodboard")], clip_id)
    st = _Stage(ctx, name, "select", len(drafts))

    def kept_key(draft_key: str, rank: int) -> str:
        return asset_key("select", select_stage.STAGE_VERSION, {"decision": decision, "rank": rank},
                         [(draft_key, "source")], None)

    with store.sessions() as s:
        prior = lineage.scores_for(s, decision)
    if prior and not ctx.forced("select"):
        ranked = sorted((sc for sc in prior if sc.kept), key=lambda sc: sc.rank)
        keys = [kept_key(sc.draft_key, sc.rank) for sc in ranked]
        if not _missing(store, keys):
            return _finish_reused(ctx, st, keys)
    t0 = time.perf_counter()
    sel = _model_call(ctx, name, "select", select_stage.select_drafts, select_stage.SelectRequest(
        prompt=d.prompt, drafts=tuple(Path(r.path) for r in drafts), moodboard=Path(board.board.path), keep=d.keep,
        clip=prof.clip, models_dir=ctx.models_dir, weights=prof.selection_weights))
    seconds = time.perf_counter() - t0
    scores = [NewScore(decision, drafts[sc.index].key, sc.prompt_score, sc.moodboard_score, sc.diversity_penalty,
                       sc.total, sc.rank, sc.rank is not None) for sc in sel.scores]
    assets = []
    for rank, i in enumerate(sel.kept, start=1):
        sc = sel.scores[i]
        params = {**recipe, "decision": decision, "rank": rank, "prompt_score": sc.prompt_score,
                  "moodboard_score": sc.moodboard_score, "diversity_penalty": sc.diversity_penalty, "total": sc.total}
        with Image.open(drafts[i].path) as im:
            size = im.size
        # Same bytes as the draft (one file on disk); its own row carries the decision.
        assets.append(NewAsset(key=kept_key(drafts[i].key, rank), stage="select", kind="image",
                               campaign=campaign.brief.campaign, deliverable=name, data=Path(drafts[i].path).read_bytes(),
                               suffix=".png", params=params, model=clip_id, width=size[0], height=size[1],
                               seconds=seconds / len(sel.kept), parents=((drafts[i].key, "source"),)))
    save(store, ctx.run_id, assets, scores)
    st.done(len(assets), 0)
    return _refs(store, [a.key for a in assets])


# -------------------------------------------------------------------------------------------- refine
def _seed_of(store: Store, key: str) -> int:
    """The draft seed at the root of a chain (refine / inpaint reuse it: one seed per lineage)."""
    with store.sessions() as s:
        node = queries.ancestry(s, key)
        while node["parents"]:
            if "seed" in node["asset"].params:
                return int(node["asset"].params["seed"])
            node = next((p for p in node["parents"] if p["role"] in ("source", "init")), node["parents"][0])
        return int(node["asset"].params.get("seed", 0))


@task(name="refine-batch", task_run_name="{name}/refine", cache_policy=NO_CACHE, **RETRIES)
def refine_task(ctx: RunContext, campaign: Campaign, name: str, kept: list[Ref], board: BoardRefs) -> list[Ref]:
    """Full-quality img2img regeneration of the kept drafts, styled by IP-Adapter with the style refs."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    prof, store, s = ctx.prof, ctx.store, ctx.prof.refine
    w, h = fit_to_area(d.aspect_ratio, s.pixels, s.multiple)
    model_id = {"pipeline": identity(prof.refine_model, ctx.models_dir),
                "ip_adapter": identity(prof.ip_adapter, ctx.models_dir)}
    seeds = [_seed_of(store, r.key) for r in kept]
    recipes = [{"prompt": d.prompt, "negative": _negative(campaign, d), "seed": seed, "width": w, "height": h,
                "steps": s.steps, "guidance": s.guidance, "strength": s.strength, "scheduler": s.scheduler,
                "ip_adapter_scale": prof.ip_adapter_scale} for seed in seeds]
    parents = [((r.key, "init"),) + tuple((sr.key, "style-ref") for sr in board.style_refs) for r in kept]
    keys = [asset_key("refine", refine_stage.STAGE_VERSION, rc, p, model_id) for rc, p in zip(recipes, parents)]
    st = _Stage(ctx, name, "refine", len(keys))
    missing = _to_compute(ctx, "refine", keys)
    if not missing:
        return _finish_reused(ctx, st, keys)
    todo = [i for i, k in enumerate(keys) if k in missing]
    t0 = time.perf_counter()
    batch = _batch(ctx, name, "refine", s.batch_size)
    images = _model_call(ctx, name, "refine", refine_stage.refine, refine_stage.RefineRequest(
        prompt=d.prompt, negative=recipes[0]["negative"], inits=tuple(Path(kept[i].path) for i in todo),
        seeds=tuple(seeds[i] for i in todo), style_refs=tuple(Path(r.path) for r in board.style_refs), width=w,
        height=h, steps=s.steps, guidance=s.guidance, strength=s.strength, scheduler=s.scheduler,
        ip_adapter_scale=prof.ip_adapter_scale, model=prof.refine_model, ip_adapter=prof.ip_adapter,
        models_dir=ctx.models_dir, batch_size=batch), on_progress=st.on_progress, batch=batch)
    per = (time.perf_counter() - t0) / len(images)
    save(store, ctx.run_id, [_image_asset(keys[i], "refine", campaign.brief.campaign, name, im, recipes[i], model_id,
                                          per, parents[i]) for i, im in zip(todo, images)])
    lineage.mark_reused(store, ctx.run_id, [k for k in keys if k not in missing])
    st.done(len(todo), len(keys) - len(todo))
    return _refs(store, keys)


# ----------------------------------------------------------------------------------------- post-edit
@task(name="inpaint-batch", task_run_name="{name}/inpaint", cache_policy=NO_CACHE, **RETRIES)
def inpaint_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref], board: BoardRefs) -> list[Ref]:
    """Repaint the brief's region / mask in every image; the mask itself is an asset."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    spec, prof, store, s = d.post.inpaint, ctx.prof, ctx.store, ctx.prof.inpaint
    st = _Stage(ctx, name, "inpaint", len(sources))
    # 1. The mask assets: the brief's mask file, a drawn region (at the sources' size), or the faces
    #    found in each source (one mask per source, a child of that source).
    with Image.open(sources[0].path) as im:
        size = im.size
    mask_file = campaign.mask_for(name)
    masks: list[NewAsset] = []
    if spec.faces:
        for r in sources:
            with Image.open(r.path) as im:
                mask_img, boxes = postedit.face_mask(im.convert("RGB"))
            params = {"from": f"faces:opencv-haar:{postedit.HAAR_CASCADE}", "faces": [list(b) for b in boxes]}
            key = asset_key("mask", postedit.STAGE_VERSIONS["mask"], {"from": params["from"]}, [(r.key, "source")], None)
            masks.append(_image_asset(key, "mask", campaign.brief.campaign, name, mask_img, params, None, 0.0,
                                      ((r.key, "source"),), kind="mask"))
    else:
        if mask_file is not None:
            data = mask_file.read_bytes()
            params = {"source": str(mask_file.relative_to(campaign.root)), "sha256": hashlib.sha256(data).hexdigest()}
            with Image.open(io.BytesIO(data)) as m:
                mask_img = m.convert("L")
        else:
            params = {"region": list(spec.region), "shape": spec.shape, "width": size[0], "height": size[1]}
            mask_img = postedit.region_mask(size, spec.region, spec.shape)
        key = asset_key("mask", postedit.STAGE_VERSIONS["mask"], params, [], None)
        masks.append(_image_asset(key, "mask", campaign.brief.campaign, name, mask_img, params, None, 0.0, (),
                                  kind="mask"))
    mask_keys = [m.key for m in masks]
    new_masks = _missing(store, mask_keys)
    if new_masks:
        save(store, ctx.run_id, [m for m in masks if m.key in new_masks])
    lineage.mark_reused(store, ctx.run_id, [k for k in mask_keys if k not in new_masks])
    mask_refs = _refs(store, mask_keys)
    mask_for = (lambda i: mask_refs[i]) if len(mask_refs) > 1 else (lambda i: mask_refs[0])
    # 2. The inpainted images.
    model_id = {"pipeline": identity(prof.refine_model, ctx.models_dir),
                "ip_adapter": identity(prof.ip_adapter, ctx.models_dir)}
    seeds = [_seed_of(store, r.key) for r in sources]
    recipes = [{"prompt": spec.prompt, "negative": _negative(campaign, d), "seed": seed, "steps": s.steps,
                "guidance": s.guidance, "strength": s.strength, "scheduler": s.scheduler,
                "ip_adapter_scale": prof.ip_adapter_scale} for seed in seeds]
    parents = [((r.key, "source"), (mask_for(i).key, "mask")) + tuple((sr.key, "style-ref") for sr in board.style_refs)
               for i, r in enumerate(sources)]
    keys = [asset_key("inpaint", postedit.STAGE_VERSIONS["inpaint"], rc, p, model_id) for rc, p in zip(recipes, parents)]
    missing = _to_compute(ctx, "inpaint", keys)
    if not missing:
        return _finish_reused(ctx, st, keys)
    todo = [i for i, k in enumerate(keys) if k in missing]
    t0 = time.perf_counter()
    images = _model_call(ctx, name, "inpaint", postedit.inpaint, postedit.InpaintRequest(
        sources=tuple(Path(sources[i].path) for i in todo), masks=tuple(Path(mask_for(i).path) for i in todo),
        prompt=spec.prompt,
        negative=recipes[0]["negative"], seeds=tuple(seeds[i] for i in todo), steps=s.steps, guidance=s.guidance,
        strength=s.strength, scheduler=s.scheduler, style_refs=tuple(Path(r.path) for r in board.style_refs),
        ip_adapter_scale=prof.ip_adapter_scale, model=prof.refine_model, ip_adapter=prof.ip_adapter,
        models_dir=ctx.models_dir, multiple=s.multiple), on_progress=st.on_progress)
    per = (time.perf_counter() - t0) / len(images)
    save(store, ctx.run_id, [_image_asset(keys[i], "inpaint", campaign.brief.campaign, name, im, recipes[i], model_id,
                                          per, parents[i]) for i, im in zip(todo, images)])
    lineage.mark_reused(store, ctx.run_id, [k for k in keys if k not in missing])
    st.done(len(todo), len(keys) - len(todo))
    return _refs(store, keys)


@task(name="face-restore-batch", task_run_name="{name}/face-restore", cache_policy=NO_CACHE, **RETRIES)
def face_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref]) -> list[Ref]:
    """Detect faces (OpenCV Haar) and restore each with GFPGAN; boxes go into lineage."""
    prof, store = ctx.prof, ctx.store
    model_id = identity(prof.face, ctx.models_dir)
    recipe = {"detector": f"opencv-haar:{postedit.HAAR_CASCADE}", "face_size": prof.face_size, "max_faces": 4,
              "margin": 0.5}
    keys = [asset_key("face_restore", postedit.STAGE_VERSIONS["face_restore"], recipe, [(r.key, "source")], model_id)
            for r in sources]
    st = _Stage(ctx, name, "face_restore", len(keys))
    missing = _to_compute(ctx, "face_restore", keys)
    if not missing:
        return _finish_reused(ctx, st, keys)
    todo = [i for i, k in enumerate(keys) if k in missing]
    t0 = time.perf_counter()
    results = _model_call(ctx, name, "face_restore", postedit.restore_faces, postedit.FaceRequest(
        sources=tuple(Path(sources[i].path) for i in todo), face=prof.face, models_dir=ctx.models_dir,
        face_size=prof.face_size, max_faces=recipe["max_faces"], margin=recipe["margin"]), on_progress=st.on_progress)
    per = (time.perf_counter() - t0) / len(results)
    save(store, ctx.run_id, [
        _image_asset(keys[i], "face_restore", campaign.brief.campaign, name, r.image,
                     {**recipe, "faces": [list(b) for b in r.boxes]}, model_id, per, ((sources[i].key, "source"),))
        for i, r in zip(todo, results)])
    lineage.mark_reused(store, ctx.run_id, [k for k in keys if k not in missing])
    st.done(len(todo), len(keys) - len(todo))
    return _refs(store, keys)


@task(name="upscale-batch", task_run_name="{name}/upscale", cache_policy=NO_CACHE, **RETRIES)
def upscale_task(ctx: RunContext, campaign: Campaign, name: str, sources: list[Ref]) -> list[Ref]:
    """Real-ESRGAN x4 (tiled), then a Lanczos cover-fit to the delivered size."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    prof, store = ctx.prof, ctx.store
    model_id = identity(prof.upscale, ctx.models_dir)
    size = d.final_size()
    recipe = {"width": size[0], "height": size[1], "tile": prof.upscale_tile, "fit": "cover-lanczos"}
    keys = [asset_key("upscale", postedit.STAGE_VERSIONS["upscale"], recipe, [(r.key, "source")], model_id)
            for r in sources]
    st = _Stage(ctx, name, "upscale", len(keys))
    missing = _to_compute(ctx, "upscale", keys)
    if not missing:
        return _finish_reused(ctx, st, keys)
    todo = [i for i, k in enumerate(keys) if k in missing]
    t0 = time.perf_counter()
    images = _model_call(ctx, name, "upscale", postedit.upscale, postedit.UpscaleRequest(
        sources=tuple(Path(sources[i].path) for i in todo), size=size, model=prof.upscale, models_dir=ctx.models_dir,
        tile=prof.upscale_tile), on_progress=st.on_progress)
    per = (time.perf_counter() - t0) / len(images)
    assets = [_image_asset(keys[i], "upscale", campaign.brief.campaign, name, im, recipe, model_id, per,
                           ((sources[i].key, "source"),)) for i, im in zip(todo, images)]
    save(store, ctx.run_id, assets)
    lineage.mark_reused(store, ctx.run_id, [k for k in keys if k not in missing])
    st.done(len(todo), len(keys) - len(todo))
    refs = _refs(store, keys)
    # The contact sheet's thumbnails of these (4K) finals, from memory: unless the store kept other bytes
    # under a key (recorded first by another run), the stored file is this image.
    for i, a, im in zip(todo, assets, images):
        if (sha := Path(refs[i].path).stem) == hashlib.sha256(a.data).hexdigest():
            contact_sheet.cache_thumbnails(contact_sheet.thumbs_dir(ctx.home), sha, im)
    return refs


GPU_TAG = "gpu"
GPU_TASKS = (moodboard_task, draft_task, select_task, refine_task, inpaint_task, face_task, upscale_task)


@task(name="export-finals", task_run_name="{name}/export", cache_policy=NO_CACHE, **RETRIES)
def export_task(ctx: RunContext, campaign: Campaign, name: str, finals: list[Ref]) -> list[str]:
    """Deliver each final as ``<home>/outputs/<campaign>/<deliverable>-<n>.png`` with its lineage sidecar
    (``<deliverable>-<n>.png.json``), and mark it final.

    The delivered file is a C2PA-signed copy of the asset (``atelier.credentials``): the asset file in
    ``assets/`` stays content-addressed and untouched, so keys and reuse do not depend on signing
    (each signature is new: a time, a random manifest id). An unchanged final already delivered is not signed
    again (``credentials.sign_file_once``). With ``ATELIER_C2PA=off`` it is a hard link.
    """
    out_dir = Path(ctx.home) / "outputs" / campaign.brief.campaign
    out_dir.mkdir(parents=True, exist_ok=True)
    signing = credentials.signing_config(Path(ctx.home))
    with ctx.store.sessions() as s:
        docs = [metadata.doc_from_store(s, ref.key) for ref in finals]  # the document the PNG carries
    paths = []
    for n, (ref, doc) in enumerate(zip(finals, docs), start=1):
        target = out_dir / f"{name}-{n}{Path(ref.path).suffix}"
        if signing is not None:
            with ctx.store.sessions() as s:
                manifest, ingredients = credentials.final_credentials(s, ctx.store.files.path, ref.key, target.name)
            credentials.sign_file_once(Path(ref.path), target, signing, manifest, ingredients,
                                       Path(ctx.home) / "cache" / "c2pa-signed")
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
    return paths
