"""Stage 2 — drafts: cheap text-to-image batches (LCM / Turbo / schnell, 1-4 steps), a seed sweep.

Each image gets its own seeded generator, so draft i is reproducible from its seed alone whatever
the batch size (which is why ``batch_size`` is not part of a draft's key).

A ``remote`` model (``atelier.backends``: a hosted API, a ComfyUI server) makes one request per draft
instead, ``batch_size`` of them in flight; each output records what the backend was sent and answered
(``facts["remote"]``: backend, model, version, request id, params sent, determinism, dollars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atelier.models import Models, device
from atelier.profiles import ModelSpec
from stages.common import batched, generators
from stages.prompts import prompt_kwargs
from stages.protocol import Output, Progress, Stage, per_item, runtime, uses_model

STAGE_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class DraftRequest:
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    model: ModelSpec = uses_model("pipeline")
    seeds: tuple[int, ...] = per_item("seed")
    indices: tuple[int, ...] = per_item("index")  # position in the deliverable's seed sweep
    batch_size: int = runtime(4)
    budget: Any = runtime(None)  # a remote model's spending limit (``atelier.backends.costs.Budget``)


def check_inputs(req: DraftRequest) -> None:
    if not req.seeds:
        raise ValueError("no seeds: nothing to draft")
    if len(req.indices) != len(req.seeds):
        raise ValueError(f"{len(req.seeds)} seeds but {len(req.indices)} indices")
    if not 1 <= req.steps <= 50:
        raise ValueError(f"draft steps must be 1..50, got {req.steps}")
    if req.model.kind == "remote":
        return  # the backend sends the size it supports nearest to the one asked for
    multiple = 16 if req.model.family == "flux" else 8  # FLUX: VAE factor 8 x 2x2 latent patches
    if req.width % multiple or req.height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, got {req.width}x{req.height}")


def generate_drafts(req: DraftRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    check_inputs(req)
    if req.model.kind == "remote":
        return _remote_drafts(req, on_progress)
    # 2. Get the shared pipeline with the requested scheduler (no IP-Adapter for drafts)
    pipe = models.pipeline(req.model, "txt2img", req.scheduler, ip_adapter=None)
    dev = device()
    # FLUX has no classifier-free guidance: guidance_scale is the distilled guidance (dev) or ignored
    # (schnell), and a negative prompt would need true CFG (two passes), which drafts never use.
    use_negative = req.guidance > 1 and req.model.family != "flux"
    # 3. Generate batch by batch; one generator per image
    out: list[Output] = []
    for seeds in batched(req.seeds, req.batch_size):
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt] * len(seeds),
                            [req.negative] * len(seeds) if use_negative else None),
            width=req.width, height=req.height, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators(seeds, dev),
        )
        out += [Output(image) for image in result.images]
        if on_progress:
            on_progress(len(out), len(req.seeds))
    return out


def _remote_drafts(req: DraftRequest, on_progress: Progress | None) -> list[Output]:
    """One request per seed to the remote backend; steps, guidance and scheduler are the backend's own."""
    from atelier import backends

    made = backends.generate_items(req.model, req.prompt, req.negative, req.width, req.height, req.seeds,
                                   concurrency=req.batch_size, context="draft", budget=req.budget,
                                   on_progress=on_progress)
    return [Output(m.image(), {"remote": m.facts}) for m in made]


STAGE = Stage("draft", STAGE_VERSION, generate_drafts, batch_field="batch_size")
