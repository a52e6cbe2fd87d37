"""Stage 4 — refine: full-quality img2img regeneration of each kept draft, styled by IP-Adapter.

The draft is resized to the refine resolution and used as the init image (``strength`` decides how
much is regenerated); the mood board's style references condition every image through IP-Adapter.
The img2img pipeline shares the base pipeline's modules via ``from_pipe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from atelier.registry import ModelSpec, device, pipeline
from stages.common import Progress, batched, generators, load_rgb
from stages.prompts import prompt_kwargs

STAGE_VERSION = 1


@dataclass(frozen=True)
class RefineRequest:
    prompt: str
    negative: str
    inits: tuple[Path, ...]  # kept drafts
    seeds: tuple[int, ...]  # one per init
    style_refs: tuple[Path, ...]
    width: int
    height: int
    steps: int
    guidance: float
    strength: float
    scheduler: str
    ip_adapter_scale: float
    model: ModelSpec
    ip_adapter: ModelSpec
    models_dir: Path
    batch_size: int = 2


def check_inputs(req: RefineRequest) -> None:
    if len(req.inits) != len(req.seeds):
        raise ValueError(f"{len(req.inits)} init images but {len(req.seeds)} seeds")
    if not req.style_refs:
        raise ValueError("refine needs at least one style reference for IP-Adapter")
    if not 0 < req.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    if req.model.family == "flux" and (req.width % 16 or req.height % 16):
        raise ValueError(f"FLUX needs width and height in multiples of 16, got {req.width}x{req.height}")


def refine(req: RefineRequest, on_progress: Progress | None = None) -> list[Image.Image]:
    # 1. Check inputs
    check_inputs(req)
    # 2. Pipeline with IP-Adapter on the shared UNet
    pipe = pipeline(req.model, req.models_dir, "img2img", req.scheduler, ip_adapter=req.ip_adapter)
    pipe.set_ip_adapter_scale(req.ip_adapter_scale)
    dev = device()
    refs = [load_rgb(p) for p in req.style_refs]
    # FLUX: no negative prompt (it needs true CFG), guidance_scale is the distilled guidance, and the
    # output size must be given (FluxImg2ImgPipeline defaults to 1024x1024 instead of the init's size)
    flux = req.model.family == "flux"
    size = {"width": req.width, "height": req.height} if flux else {}
    # 3. Regenerate from each draft at the refine size
    out: list[Image.Image] = []
    pairs = list(zip(req.inits, req.seeds))
    for chunk in batched(pairs, req.batch_size):
        inits = [load_rgb(p).resize((req.width, req.height), Image.Resampling.LANCZOS) for p, _ in chunk]
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt] * len(chunk),
                            None if flux else [req.negative] * len(chunk)),
            image=inits,
            ip_adapter_image=[refs],  # one adapter, all style refs: (1 adapter) x (n refs)
            strength=req.strength, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators([s for _, s in chunk], dev), **size,
        )
        out += result.images
        if on_progress:
            on_progress(len(out), len(pairs))
    return out
