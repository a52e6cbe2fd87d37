"""The model registry: profiles are data; each model is loaded once per process.

A *profile* names one model per role (draft, refine, IP-Adapter, CLIP, face restore, upscale) plus
the sampling settings of each stage. Stages receive ``ModelSpec``s (frozen, hashable) and call the
``load_*`` functions here, which import torch / diffusers / open_clip lazily and cache the loaded
objects in this process. An unknown profile fails with the list of known names.

``source`` is one of:
- ``tiny:<name>``: a random-weight test model built from a config (``atelier.tiny``), saved under the
  models folder and loaded back through the same ``from_pretrained`` / file code as a real checkpoint;
- a local path (a diffusers folder, a ``.pth`` / ``.safetensors`` file);
- a Hugging Face id, read from the local HF cache only (no machine here reaches a hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # diffusers | ip-adapter | open-clip | gfpgan | realesrgan
    source: str
    arch: str = ""  # open_clip architecture, or the GFPGAN / Real-ESRGAN network variant
    subfolder: str = ""  # ip-adapter: folder of the weights inside source
    weight_name: str = ""  # ip-adapter / single-file weights inside source


@dataclass(frozen=True)
class StageSettings:
    steps: int
    guidance: float
    scheduler: str  # a key of SCHEDULERS
    pixels: int  # target area of the stage's output; the deliverable's aspect decides the shape
    multiple: int = 64  # both sides are rounded to this (VAE factor x UNet down-sampling)
    strength: float = 1.0  # img2img / inpaint denoising strength
    batch_size: int = 4  # images per pipeline call


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    random_weights: bool  # True: outputs are noise from test models, say so in reports
    draft_model: ModelSpec
    refine_model: ModelSpec
    ip_adapter: ModelSpec
    clip: ModelSpec
    face: ModelSpec
    upscale: ModelSpec
    draft: StageSettings
    refine: StageSettings
    inpaint: StageSettings
    ip_adapter_scale: float = 0.6
    upscale_tile: int = 256  # Real-ESRGAN tile size in input px; bounds peak memory
    face_size: int = 512  # aligned face crop the restorer works at
    selection_weights: tuple[float, float, float] = (1.0, 0.5, 0.3)  # prompt fit, mood-board fit, diversity


SCHEDULERS = {
    "lcm": "LCMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++-2m-karras": "DPMSolverMultistepScheduler",
}

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="random-weight test models (CPU, seconds per stage); outputs are noise",
        random_weights=True,
        draft_model=ModelSpec("tiny-sd", "diffusers", "tiny:sd"),
        refine_model=ModelSpec("tiny-sd", "diffusers", "tiny:sd"),
        ip_adapter=ModelSpec("tiny-ip-adapter", "ip-adapter", "tiny:ip-adapter", subfolder="models",
                             weight_name="ip-adapter_tiny.safetensors"),
        clip=ModelSpec("tiny-clip", "open-clip", "tiny:open-clip", arch="atelier-tiny-clip",
                       weight_name="open_clip_model.safetensors"),
        face=ModelSpec("tiny-gfpgan", "gfpgan", "tiny:gfpgan", arch="clean", weight_name="GFPGAN-tiny.pth"),
        upscale=ModelSpec("tiny-realesrgan", "realesrgan", "tiny:realesrgan", arch="srvgg",
                          weight_name="realesrgan-tiny-x4.pth"),
        draft=StageSettings(steps=4, guidance=1.0, scheduler="lcm", pixels=64 * 64, multiple=16),
        refine=StageSettings(steps=8, guidance=5.0, scheduler="euler", pixels=192 * 192, multiple=16, strength=0.6),
        inpaint=StageSettings(steps=6, guidance=5.0, scheduler="euler", pixels=0, multiple=16, strength=1.0),
        upscale_tile=128,
        face_size=128,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


# ----------------------------------------------------------------------------------------- devices
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(dev: str):
    """fp16 on CUDA (every seed checkpoint ships fp16-safe weights), fp32 on CPU."""
    import torch

    return torch.float16 if dev == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------- sources
def resolve(spec: ModelSpec, models_dir: Path) -> Path:
    """Local folder or file holding ``spec``'s weights; builds tiny models on first use."""
    if spec.source.startswith("tiny:"):
        from atelier import tiny

        return tiny.ensure(spec.source.removeprefix("tiny:"), models_dir)
    path = Path(spec.source).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail in milliseconds, never a 40 s retry loop
    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub error means "not available locally"
        raise FileNotFoundError(
            f"model {spec.name!r} ({spec.source}) is not available locally; on a connected machine run "
            f"`huggingface-cli download {spec.source}` and copy the cache (HF_HOME) here"
        ) from exc


_hash_lock = threading.Lock()


def weights_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 over every weight file under ``path`` (sorted by relative name), cached by size+mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    cache: dict[str, Any] = {}
    if cache_file and cache_file.exists():
        cache = json.loads(cache_file.read_text() or "{}")
    stamp = [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    entry = cache.get(str(path.resolve()))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    h = hashlib.sha256()
    for p, (rel, _, _) in zip(files, stamp):
        h.update(rel.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if cache_file:
        with _hash_lock:
            cache[str(path.resolve())] = {"stamp": stamp, "sha256": digest}
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
    return digest


_identity_cache: dict[tuple[ModelSpec, Path], dict] = {}


def identity(spec: ModelSpec, models_dir: Path) -> dict:
    """What lineage records about a model: name, source, kind and a hash of its weights."""
    key = (spec, models_dir)
    if key not in _identity_cache:
        path = resolve(spec, models_dir)
        _identity_cache[key] = {
            "name": spec.name, "kind": spec.kind, "source": spec.source, "arch": spec.arch,
            "weights_sha256": weights_sha256(path, models_dir / "weights-sha256.json"),
        }
    return _identity_cache[key]


# ----------------------------------------------------------------------------------------- loaders
_models: dict[tuple, Any] = {}
_load_lock = threading.RLock()


def _cached(key: tuple, load):
    with _load_lock:
        if key not in _models:
            _models[key] = load()
        return _models[key]


def load_text2image(spec: ModelSpec, models_dir: Path):
    """The base diffusers pipeline for ``spec`` (loaded once; img2img / inpaint share its modules)."""

    def load():
        from atelier import compat

        compat.apply()
        from diffusers import AutoPipelineForText2Image

        dev = device()
        pipe = AutoPipelineForText2Image.from_pretrained(
            resolve(spec, models_dir), torch_dtype=dtype_for(dev), local_files_only=True,
            safety_checker=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dev)

    return _cached(("t2i", spec, models_dir), load)


def pipeline(spec: ModelSpec, models_dir: Path, mode: str, scheduler: str, ip_adapter: ModelSpec | None = None):
    """A pipeline for ``mode`` (txt2img | img2img | inpaint) sharing the base pipeline's modules.

    ``from_pipe`` reuses the same UNet / VAE / text encoder objects, so the model is in memory once.
    IP-Adapter weights live on the shared UNet: they are loaded when ``ip_adapter`` is given and
    unloaded otherwise, so a call never sees a stale adapter.
    """
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
    import diffusers

    base = load_text2image(spec, models_dir)
    with _load_lock:
        loaded = getattr(base, "_atelier_ip_adapter", None)
        if loaded != ip_adapter:
            if loaded is not None:
                base.unload_ip_adapter()
            if ip_adapter is not None:
                base.load_ip_adapter(str(resolve(ip_adapter, models_dir)), subfolder=ip_adapter.subfolder,
                                     weight_name=ip_adapter.weight_name, local_files_only=True)
            base._atelier_ip_adapter = ip_adapter
    if mode == "txt2img":
        pipe = base
    elif mode == "img2img":
        pipe = _cached(("i2i", spec, models_dir), lambda: AutoPipelineForImage2Image.from_pipe(base))
    elif mode == "inpaint":
        pipe = _cached(("inp", spec, models_dir), lambda: AutoPipelineForInpainting.from_pipe(base))
    else:
        raise ValueError(f"unknown pipeline mode {mode!r}; known: txt2img, img2img, inpaint")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    extra = {"use_karras_sigmas": True} if scheduler == "dpm++-2m-karras" else {}
    if type(pipe.scheduler).__name__ != cls.__name__ or extra:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Clip:
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str


def load_clip(spec: ModelSpec, models_dir: Path) -> Clip:
    def load():
        from atelier import compat

        compat.apply()
        import open_clip

        path = resolve(spec, models_dir)
        config = path / f"{spec.arch}.json" if path.is_dir() else None
        if config is not None and config.exists():
            open_clip.add_model_config(config)  # a custom architecture shipped beside its weights
        weights = str(path / spec.weight_name) if path.is_dir() and spec.weight_name else str(path)
        dev = device()
        model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=weights, device=dev)
        model.eval()
        return Clip(model, preprocess, open_clip.get_tokenizer(spec.arch), dev)

    return _cached(("clip", spec, models_dir), load)


def load_face_restorer(spec: ModelSpec, models_dir: Path):
    """The GFPGAN network (eval mode). We drive it directly: GFPGANer would download detector weights."""

    def load():
        from atelier import compat

        compat.apply()
        import torch
        from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

        path = resolve(spec, models_dir)
        weights = path / spec.weight_name if path.is_dir() else path
        arch_file = weights.parent / "arch.json"
        args = json.loads(arch_file.read_text()) if arch_file.exists() else dict(
            out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
            num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)  # GFPGAN v1.3 / v1.4
        net = GFPGANv1Clean(**args)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("params_ema", state.get("params", state)), strict=True)
        return net.eval().to(device())

    return _cached(("face", spec, models_dir), load)


def load_upscaler(spec: ModelSpec, models_dir: Path, tile: int):
    """A ``realesrgan.RealESRGANer`` around the spec's network, tiled to bound memory."""

    def load():
        from atelier import compat

        compat.apply()
        import torch
        from realesrgan import RealESRGANer

        path = resolve(spec, models_dir)
        weights = path / spec.weight_name if path.is_dir() else path
        arch_file = weights.parent / "arch.json"
        args = json.loads(arch_file.read_text()) if arch_file.exists() else {}
        if spec.arch == "srvgg":
            from realesrgan.archs.srvgg_arch import SRVGGNetCompact

            args = args or dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4, act_type="prelu")
            net, scale = SRVGGNetCompact(**args), args["upscale"]
        elif spec.arch == "rrdb":
            from basicsr.archs.rrdbnet_arch import RRDBNet

            args = args or dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
            net, scale = RRDBNet(**args), args["scale"]
        else:
            raise ValueError(f"unknown Real-ESRGAN arch {spec.arch!r}; known: srvgg, rrdb")
        dev = device()
        return RealESRGANer(scale=scale, model_path=str(weights), model=net, tile=tile, tile_pad=10, pre_pad=0,
                            half=dev == "cuda", device=torch.device(dev))

    return _cached(("up", spec, models_dir, tile), load)
