"""Stage 2 — drafts: cheap text-to-image batches (LCM / Turbo / schnell, 1-4 steps), a seed sweep.

Each image gets its own seeded generator, so draft i is reproducible from its seed alone whatever
the batch size. The pipeline comes from the registry (loaded once per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from atelier.registry import ModelSpec, device, pipeline
from stages.common import Progress, batched, generators
from stages.prompts import prompt_kwargs

STAGE_VERSION = 1


@dataclass(frozen=True)
class DraftRequest:
    prompt: str
    negative: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    model: ModelSpec
    models_dir: Path
    batch_size: int = 4


@dataclass(frozen=True)
class Draft:
    seed: int
    image: Image.Image


def check_inputs(req: DraftRequest) -> None:
    if not req.seeds:
        raise ValueError("no seeds: nothing to draft")
    if not 1 <= req.steps <= 50:
        raise ValueError(f"draft steps must be 1..50, got {req.steps}")
    multiple = 16 if req.model.family == "flux" else 8  # FLUX: VAE factor 8 x 2x2 latent patches
    if req.width % multiple or req.height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, got {req.width}x{req.height}")


def generate_drafts(req: DraftRequest, on_progress: Progress | None = None) -> list[Draft]:
    # 1. Check inputs
    check_inputs(req)
    # 2. Get the shared pipeline with the requested scheduler (no IP-Adapter for drafts)
    pipe = pipeline(req.model, req.models_dir, "txt2img", req.scheduler, ip_adapter=None)
    dev = device()
    # FLUX has no classifier-free guidance: guidance_scale is the distilled guidance (dev) or ignored
    # (schnell), and a negative prompt would need true CFG (two passes), which drafts never use.
    use_negative = req.guidance > 1 and req.model.family != "flux"
    # 3. Generate batch by batch; one generator per image
    out: list[Draft] = []
    for seeds in batched(req.seeds, req.batch_size):
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt] * len(seeds),
                            [req.negative] * len(seeds) if use_negative else None),
            width=req.width, height=req.height, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators(seeds, dev),
        )
        out += [Draft(seed, image) for seed, image in zip(seeds, result.images)]
        if on_progress:
            on_progress(len(out), len(req.seeds))
    return out
