"""Rounds — variations: img2img of each kept image at the round's strength, with new derived seeds.

A round after the first selection varies what the round before kept: ``subtle`` (strength 0.5) keeps the
layout and redraws details, ``strong`` (0.85) keeps little more than the palette and rough composition.
Variations are drafts: same draft model, resolution and step count (img2img runs ``steps x strength`` of
them); each is a child of the image it varies (role ``init``) and records its round.

A ``remote`` draft model (``atelier.backends``) gets one image-to-image request per variation (the kept image
at the draft size as its init, the seed, the strength where the API takes one), ``batch_size`` in flight, as
drafts do; each output records what was sent (``facts["remote"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from atelier.models import Models, device
from atelier.profiles import ModelSpec
from stages.common import batched, generators, load_rgb, png_bytes
from stages.prompts import prompt_kwargs
from stages.protocol import Input, Output, Progress, Stage, per_item, runtime, uses_model

STAGE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class VaryRequest:
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    guidance: float
    strength: float
    scheduler: str
    round: int  # 1 = the first round after the initial drafts
    model: ModelSpec = uses_model("pipeline")
    inits: tuple[Input, ...] = per_item("init", role="init")  # the kept image each variation varies
    seeds: tuple[int, ...] = per_item("seed")
    variations: tuple[int, ...] = per_item("variation")  # j-th variation of its init
    batch_size: int = runtime(4)
    budget: Any = runtime(None)  # a remote model's spending limit (``atelier.backends.costs.Budget``)


def check_inputs(req: VaryRequest) -> None:
    if not req.inits:
        raise ValueError("no images to vary")
    if not len(req.inits) == len(req.seeds) == len(req.variations):
        raise ValueError(f"{len(req.inits)} inits, {len(req.seeds)} seeds, {len(req.variations)} variation numbers")
    if not 0 < req.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    if req.round < 1:
        raise ValueError(f"variation rounds count from 1, got {req.round}")
    if req.steps * req.strength < 1:
        raise ValueError(f"{req.steps} steps at strength {req.strength} run no denoising step: raise either")


def vary(req: VaryRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    check_inputs(req)
    if req.model.kind == "remote":
        return _remote_vary(req, on_progress)
    # 2. The draft model's img2img pipeline (shared modules; no IP-Adapter, like drafts)
    pipe = models.pipeline(req.model, "img2img", req.scheduler, ip_adapter=None)
    dev = device()
    flux = req.model.family == "flux"
    use_negative = req.guidance > 1 and not flux
    size = {"width": req.width, "height": req.height} if flux else {}
    # 3. Vary, batch by batch, one generator per variation
    out: list[Output] = []
    items = list(zip(req.inits, req.seeds))
    for chunk in batched(items, req.batch_size):
        inits = [load_rgb(i.path).resize((req.width, req.height), Image.Resampling.LANCZOS) for i, _ in chunk]
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt] * len(chunk),
                            [req.negative] * len(chunk) if use_negative else None),
            image=inits, strength=req.strength, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators([s for _, s in chunk], dev), **size,
        )
        out += [Output(image) for image in result.images]
        if on_progress:
            on_progress(len(out), len(items))
    return out


def _remote_vary(req: VaryRequest, on_progress: Progress | None) -> list[Output]:
    """One image-to-image request per variation, its init resized to the draft size and sent as PNG."""
    from atelier import backends

    pngs: dict[str, bytes] = {}  # each kept image is varied several times: encode it once
    for i in req.inits:
        if i.key not in pngs:
            pngs[i.key] = png_bytes(load_rgb(i.path).resize((req.width, req.height), Image.Resampling.LANCZOS))
    made = backends.generate_items(req.model, req.prompt, req.negative, req.width, req.height, req.seeds,
                                   inits=tuple(pngs[i.key] for i in req.inits), strength=req.strength,
                                   concurrency=req.batch_size, context=f"vary r{req.round}", budget=req.budget,
                                   on_progress=on_progress)
    return [Output(m.image(), {"remote": m.facts}) for m in made]


STAGE = Stage("vary", STAGE_VERSION, vary, batch_field="batch_size")
