"""The micro models as atelier's stages load them: their ``ModelSpec``s and the same loaders and embeddings.

The world's tests and bench go through ``atelier.models.Models`` (the process model cache), so they exercise
the production loading path; the ``micro`` profile itself is data in ``atelier.profiles``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from atelier.models import Clip, Models
from atelier.profiles import MICRO_DIR, PROFILES, ModelSpec, Profile
from atelier.world.models import CLIP_ARCH
from stages.common import embed_images, embed_texts  # noqa: F401 - as the mood board and selection embed

CLIP_WEIGHT_NAME = "open_clip_model.safetensors"
IP_SUBFOLDER = "models"
IP_WEIGHT_NAME = "ip-adapter_micro.safetensors"


def specs(root: Path) -> dict[str, ModelSpec]:
    """ModelSpecs of the micro models under ``root`` (the folder ``atelier.world.train`` exports to)."""
    root = Path(root).resolve()
    return {
        "clip": ModelSpec("micro-clip", "open-clip", str(root / "clip"), arch=CLIP_ARCH, weight_name=CLIP_WEIGHT_NAME),
        "sd": ModelSpec("micro-sd", "diffusers", str(root / "sd"), family="sd"),
        "ip_adapter": ModelSpec("micro-ip-adapter", "ip-adapter", str(root / "ip-adapter"), subfolder=IP_SUBFOLDER,
                                weight_name=IP_WEIGHT_NAME),
    }


def load_clip(spec: ModelSpec, models_dir: Path) -> Clip:
    """atelier's CLIP object (model, preprocess, tokenizer, device) for ``spec``."""
    return Models.at(Path(models_dir)).clip(spec)


def pipeline(spec: ModelSpec, models_dir: Path, mode: str, scheduler: str, ip_adapter: ModelSpec | None = None) -> Any:
    """atelier's shared diffusers pipeline for ``mode`` (txt2img | img2img | inpaint)."""
    return Models.at(Path(models_dir)).pipeline(spec, mode, scheduler, ip_adapter=ip_adapter)


DEFAULT_ROOT = MICRO_DIR


def micro_profile(root: Path = DEFAULT_ROOT) -> Profile:
    """The ``micro`` profile (``atelier.profiles``), with its models read from ``root``."""
    sp = specs(root)
    return replace(PROFILES["micro"], draft_model=sp["sd"], refine_model=sp["sd"], ip_adapter=sp["ip_adapter"],
                   clip=sp["clip"])
