"""Stage 4 — refine: full-quality img2img regeneration of each kept draft, styled by IP-Adapter.

The draft is resized to the refine resolution and used as the init image (``strength`` decides how
much is regenerated); the mood board's style references condition every image through IP-Adapter.
The img2img pipeline shares the base pipeline's modules via ``from_pipe``.

A ``remote`` model (``atelier.backends``) gets one request per kept draft (the draft as its init image at
the refine size, the seed, the strength where the API takes one), ``batch_size`` in flight. Hosted APIs
have no IP-Adapter: when the ``ip_adapter`` role is remote too, the style references are sent as extra
input images where the API takes them (OpenAI image edits); each output records what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from atelier.models import Models, device
from atelier.profiles import ModelSpec
from stages.common import batched, generators, load_rgb, png_bytes
from stages.prompts import prompt_kwargs
from stages.protocol import Input, Output, Progress, Stage, parent, per_item, runtime, uses_model

STAGE_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class RefineRequest:
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    guidance: float
    strength: float
    scheduler: str
    ip_adapter_scale: float
    model: ModelSpec = uses_model("pipeline")
    ip_adapter: ModelSpec = uses_model("ip_adapter")
    style_refs: tuple[Input, ...] = parent("style-ref")
    inits: tuple[Input, ...] = per_item("init", role="init")  # kept drafts
    seeds: tuple[int, ...] = per_item("seed")  # one per init
    batch_size: int = runtime(2)
    budget: Any = runtime(None)  # a remote model's spending limit (``atelier.backends.costs.Budget``)


def check_inputs(req: RefineRequest) -> None:
    if len(req.inits) != len(req.seeds):
        raise ValueError(f"{len(req.inits)} init images but {len(req.seeds)} seeds")
    if not req.style_refs:
        raise ValueError("refine needs at least one style reference for IP-Adapter")
    if not 0 < req.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    if req.model.kind != "remote" and req.ip_adapter.kind == "remote":
        raise ValueError(f"a local refine model cannot use the remote style-reference role {req.ip_adapter.source}")
    if req.model.family == "flux" and (req.width % 16 or req.height % 16):
        raise ValueError(f"FLUX needs width and height in multiples of 16, got {req.width}x{req.height}")


def refine(req: RefineRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    check_inputs(req)
    if req.model.kind == "remote":
        return _remote_refine(req, on_progress)
    # 2. Pipeline with IP-Adapter on the shared UNet
    pipe = models.pipeline(req.model, "img2img", req.scheduler, ip_adapter=req.ip_adapter)
    pipe.set_ip_adapter_scale(req.ip_adapter_scale)
    dev = device()
    refs = [load_rgb(r.path) for r in req.style_refs]
    # FLUX: no negative prompt (it needs true CFG), guidance_scale is the distilled guidance, and the
    # output size must be given (FluxImg2ImgPipeline defaults to 1024x1024 instead of the init's size)
    flux = req.model.family == "flux"
    size = {"width": req.width, "height": req.height} if flux else {}
    # 3. Regenerate from each draft at the refine size
    out: list[Output] = []
    pairs = list(zip(req.inits, req.seeds))
    for chunk in batched(pairs, req.batch_size):
        inits = [load_rgb(i.path).resize((req.width, req.height), Image.Resampling.LANCZOS) for i, _ in chunk]
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt] * len(chunk),
                            None if flux else [req.negative] * len(chunk)),
            image=inits,
            ip_adapter_image=[refs],  # one adapter, all style refs: (1 adapter) x (n refs)
            strength=req.strength, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators([s for _, s in chunk], dev), **size,
        )
        out += [Output(image) for image in result.images]
        if on_progress:
            on_progress(len(out), len(pairs))
    return out


def _remote_refine(req: RefineRequest, on_progress: Progress | None) -> list[Output]:
    """One image-to-image request per kept draft, resized to the refine size and sent as PNG."""
    from atelier import backends

    def png(path: Path, size: tuple[int, int] | None) -> bytes:
        im = load_rgb(path)
        if size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        else:
            im.thumbnail((1024, 1024), Image.Resampling.LANCZOS)  # a reference's style survives; megabytes need not
        return png_bytes(im)

    inits = tuple(png(i.path, (req.width, req.height)) for i in req.inits)
    refs = tuple(png(r.path, None) for r in req.style_refs) if req.ip_adapter.kind == "remote" else ()
    made = backends.generate_items(req.model, req.prompt, req.negative, req.width, req.height, req.seeds, inits=inits,
                                   strength=req.strength, references=refs, concurrency=req.batch_size,
                                   context="refine", budget=req.budget, on_progress=on_progress)
    return [Output(m.image(), {"remote": m.facts}) for m in made]


STAGE = Stage("refine", STAGE_VERSION, refine, batch_field="batch_size")
