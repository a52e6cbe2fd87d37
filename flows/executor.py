"""The one executor: runs any stage for a run, reusing what is stored.

For a stage and the request it runs on (``stages.protocol``):
1. plan: the items the request produces, each with its key (from the request itself);
2. reuse check: the keys stored with their files are reused (all of them recompute under ``--force``);
3. model call on the missing items only, counted and timed; on CUDA out-of-memory the stage's batch is
   halved for the task's retry (the task retries transient errors, see ``flows.tasks.RETRIES``);
4. save through ``store.save`` (each image's PNG carries its lineage document), then the reuse marks,
   the stage row (seconds, computed / reused) and the ``Ref``s of every item, in order.
Large images (finals) get their contact-sheet thumbnails from memory here, so no 4K PNG is decoded again.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier import contact_sheet, metadata
from atelier.errors import BriefError
from atelier.models import device_used
from flows.context import RunContext
from stages.common import png_bytes
from stages.protocol import Item, Output, Stage, plan, subset
from store import NewAsset, Store, lineage, queries, save

THUMBNAIL_FROM_MEMORY = 1_000_000  # pixels: images this large get their thumbnails cached as they are made


@dataclass(frozen=True)
class Ref:
    """An asset as tasks pass it on: its key and the absolute path of its file."""

    key: str
    path: str


def refs(store: Store, keys: list[str]) -> list[Ref]:
    with store.sessions() as s:
        found = queries.existing(s, store.files, keys)
    return [Ref(k, str(store.files.path(found[k].path))) for k in keys]


def to_compute(ctx: RunContext, stage: str, keys: list[str]) -> set[str]:
    """The keys ``stage`` must compute: those not stored (with their file), or all of them under ``--force``."""
    if ctx.forced(stage):
        return set(keys)
    with ctx.store.sessions() as s:
        return set(keys) - set(queries.existing(s, ctx.store.files, keys))


# ------------------------------------------------------------------------- model calls and retries
def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory in this process (a remote backend's error text may mention it too: not ours)."""
    from atelier.backends.common import BackendError

    if isinstance(exc, BackendError):
        return False
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


NOT_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a full disk stays full for the retries' 14 s


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: CUDA out-of-memory (with a smaller batch) and I/O errors. Never bad input, never a
    file that is simply not there (a missing reference or weight file stays missing), never a full disk."""
    if isinstance(exc, (BriefError, ValueError)):
        return False
    if is_oom(exc):
        return True
    return isinstance(exc, OSError) and exc.errno not in NOT_TRANSIENT_ERRNOS and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def model_call(ctx: RunContext, deliverable: str | None, stage: Stage, req: Any, on_progress: Any = None) -> Any:
    """Run ``stage`` on ``req``, counted and timed in ``ctx.calls``; on CUDA OOM halve its batch for the retry."""
    cap_key = (deliverable, stage.name)
    if stage.batch_field and cap_key in ctx.batch_caps:
        req = dataclasses.replace(req, **{stage.batch_field: ctx.batch_caps[cap_key]})
    t0 = time.perf_counter()
    try:
        if on_progress is None:
            return stage.run(req, ctx.models)
        return stage.run(req, ctx.models, on_progress=on_progress)
    except Exception as exc:
        from atelier.backends.common import BackendError

        if isinstance(exc, BackendError):  # retried inside the backend already; name the deliverable
            raise exc.for_context(f"deliverable {deliverable or 'campaign'}") from None
        if is_oom(exc):
            if stage.batch_field:
                ctx.batch_caps[cap_key] = max(1, getattr(req, stage.batch_field) // 2)
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        raise
    finally:
        ctx.calls.count += 1
        ctx.calls.seconds += time.perf_counter() - t0
        ctx.calls.by_stage[stage.name] += 1


# --------------------------------------------------------------------------------- stage bookkeeping
class StageTimer:
    """Times one stage execution, reports its progress, and records it with its computed / reused counts."""

    def __init__(self, ctx: RunContext, deliverable: str | None, stage: str, total: int) -> None:
        self.ctx, self.deliverable, self.stage = ctx, deliverable, stage
        self.label = f"{deliverable or 'campaign'} · {stage}"
        self.on_progress = ctx.progress.begin(self.label, total)
        self.t0 = time.perf_counter()

    def done(self, computed: int, reused: int) -> float:
        seconds = time.perf_counter() - self.t0
        lineage.record_stage(self.ctx.store, self.ctx.run_id, self.deliverable, self.stage, seconds, computed,
                             reused, device_used())
        self.ctx.progress.end(self.label, f"{computed} computed, {reused} reused, {seconds:.1f}s")
        return seconds


def image_asset(store: Store, item: Item, stage: str, kind: str, campaign: str, deliverable: str | None,
                output: Output, seconds: float) -> NewAsset:
    """An image asset whose PNG carries its recipe (``atelier.metadata``): the lineage document in an
    ``atelier`` text chunk (this recipe and every ancestor's, read from the store) and the A1111
    ``parameters`` chunk. ``output.facts`` (e.g. detected faces) are recorded with the recipe."""
    chain = {}
    if item.parents:  # ancestors are committed before a child is computed
        with store.sessions() as s:
            chain = metadata.ancestors(s, [k for k, _ in item.parents])
    params = {**item.recipe, **output.facts}
    image = output.image
    own = metadata.record(stage, kind, campaign, deliverable, image.width, image.height, params, item.model,
                          item.parents)
    doc = metadata.lineage_doc(item.key, own, chain)
    return NewAsset(key=item.key, stage=stage, kind=kind, campaign=campaign, deliverable=deliverable,
                    data=png_bytes(image, metadata.png_text(doc), compress_level=3), suffix=".png", params=params,
                    model=item.model, width=image.width, height=image.height, seconds=seconds, parents=item.parents)


def finish_reused(ctx: RunContext, timer: StageTimer, keys: list[str]) -> list[Ref]:
    lineage.mark_reused(ctx.store, ctx.run_id, keys)
    timer.done(0, len(keys))
    return refs(ctx.store, keys)


# ------------------------------------------------------------------------------------- the executor
def run_stage(ctx: RunContext, stage: Stage, req: Any, campaign: str, deliverable: str | None) -> list[Ref]:
    """Run ``stage`` on ``req`` for a deliverable (None: the campaign), computing only what is not stored."""
    # 1. Plan: every item's key, from the request itself
    items = plan(stage, req, ctx.models.identity)
    keys = [it.key for it in items]
    timer = StageTimer(ctx, deliverable, stage.name, len(keys))
    # 2. Reuse check
    missing = to_compute(ctx, stage.name, keys)
    if not missing:
        return finish_reused(ctx, timer, keys)
    todo = [i for i, k in enumerate(keys) if k in missing]
    # 3. Model call on what is missing
    t0 = time.perf_counter()
    outputs = model_call(ctx, deliverable, stage, req if len(todo) == len(items) else subset(req, todo),
                         timer.on_progress)
    if len(outputs) != len(todo):
        raise RuntimeError(f"stage {stage.name} returned {len(outputs)} outputs for {len(todo)} items")
    per = (time.perf_counter() - t0) / len(outputs)
    # 4. Save, mark what was reused, record the stage
    assets = [image_asset(ctx.store, items[i], stage.name, stage.kind, campaign, deliverable, out, per)
              for i, out in zip(todo, outputs)]
    saved = save(ctx.store, ctx.run_id, assets)
    lineage.mark_reused(ctx.store, ctx.run_id, [k for k in keys if k not in missing])
    timer.done(len(todo), len(keys) - len(todo))
    out = refs(ctx.store, keys)
    _thumbnails_from_memory(ctx, [out[i] for i in todo], saved, outputs)
    return out


def _thumbnails_from_memory(ctx: RunContext, made: list[Ref], saved: dict[str, str], outputs: list[Output]) -> None:
    """The contact sheet's thumbnails of large images, from memory: unless the store kept other bytes under
    a key (recorded first by another run), the stored file (named by its sha256) is this image."""
    for ref, o in zip(made, outputs):
        if o.image.width * o.image.height >= THUMBNAIL_FROM_MEMORY and Path(ref.path).stem == saved[ref.key]:
            contact_sheet.cache_thumbnails(contact_sheet.thumbs_dir(ctx.home), saved[ref.key], o.image)
