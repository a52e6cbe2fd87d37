"""Stage 4 — refine: full-quality img2img regeneration of each kept draft, styled by IP-Adapter.

The draft is resized to the refine resolution and used as the init image (``strength`` decides how
much is regenerated); the mood board's style references condition every image through IP-Adapter.
The img2img pipeline shares the base pipeline's modules via ``from_pipe``.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from atelier.models import Models, device
from atelier.profiles import ModelSpec
from stages.common import batched, generators, load_rgb
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


def check_inputs(req: RefineRequest) -> None:
    if len(req.inits) != len(req.seeds):
        raise ValueError(f"{len(req.inits)} init images but {len(req.seeds)} seeds")
    if not req.style_refs:
        raise ValueError("refine needs at least one style reference for IP-Adapter")
    if not 0 < req.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    if req.model.family == "flux" and (req.width % 16 or req.height % 16):
        raise ValueError(f"FLUX needs width and height in multiples of 16, got {req.width}x{req.height}")


def refine(req: RefineRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    check_inputs(req)
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


STAGE = Stage("refine", STAGE_VERSION, refine, batch_field="batch_size")
