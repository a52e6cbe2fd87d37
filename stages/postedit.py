"""Stage 5 — post-edit: inpaint a region, restore faces (GFPGAN), upscale to the final size (Real-ESRGAN).

Three independent steps, each a plain function over its own request:
- ``inpaint``: repaint the mask's white area with the inpaint pipeline (shared modules via
  ``from_pipe``, IP-Adapter style refs), then composite so pixels outside the mask equal the input.
  A ``remote`` model (``atelier.backends``: OpenAI image edits, Replicate / fal inpainting models) gets
  one edit-with-mask request per image, ``batch_size`` in flight; its result is composited the same way
  (hosted models may redraw the whole image) and records what was sent.
- ``restore_faces``: a real face detector finds faces (dlib's CNN, weights inside a package; OpenCV Haar as
  the documented fallback, ``atelier.faces``); each face is cropped with margin, restored by the GFPGAN
  network at ``face_size`` and pasted back through a feathered mask, so only the face regions change. Then an
  identity check: dlib's ResNet embeds the face before and after; a restored face farther than
  ``identity_threshold`` from the original is not used (the original face stays, and the facts say so).
- ``upscale``: Real-ESRGAN x4 with tiles (memory bounded by the tile, not the image), then a Lanczos
  cover-fit to the exact delivered size.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from atelier import faces
from atelier.models import Models, device
from atelier.profiles import FACE_DETECTOR, FACE_IDENTITY, ModelSpec
from stages.common import generators, load_rgb, png_bytes
from stages.prompts import prompt_kwargs
from stages.protocol import Input, Output, Progress, Stage, parent, per_item, runtime, uses_model

STAGE_VERSIONS = {"mask": 3, "inpaint": 2, "face_restore": 3, "upscale": 2}


def _model(name: str, default: ModelSpec) -> Any:
    """``uses_model(name)`` with a default (the face models are the same in every profile)."""
    return field(default=default, metadata={"model": name})


# ------------------------------------------------------------------------------------------ inpaint
def region_mask(size: tuple[int, int], region: tuple[float, float, float, float], shape: str = "rect") -> Image.Image:
    """An 'L' mask, white (255) inside the fractional rectangle (x, y, w, h) or its inscribed ellipse."""
    w, h = size
    x, y, rw, rh = region
    mask = Image.new("L", size, 0)
    box = [round(x * w), round(y * h), max(round((x + rw) * w) - 1, 0), max(round((y + rh) * h) - 1, 0)]
    draw = ImageDraw.Draw(mask)
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "rect":
        draw.rectangle(box, fill=255)
    else:
        raise ValueError(f"unknown mask shape {shape!r}; known: rect, ellipse")
    return mask


def face_mask(size: tuple[int, int], boxes: list[tuple[int, int, int, int]], grow: float = 0.15) -> Image.Image:
    """An 'L' mask of ellipses over the face ``boxes`` (x, y, w, h), each grown by ``grow``."""
    w_img, h_img = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        dx, dy = w * grow, h * grow
        draw.ellipse([max(0, x - dx), max(0, y - dy), min(w_img - 1, x + w + dx), min(h_img - 1, y + h + dy)], fill=255)
    return mask


def face_facts(detector: ModelSpec, found: list[faces.Face]) -> dict:
    """What lineage records about detection: the boxes (largest first), their scores and the detector."""
    return {"faces": [list(f.box) for f in found], "face_scores": [f.score for f in found], "detector": detector.name}


# Masks are assets like any other: three ways to make one, each a stage with its own request.
@dataclass(frozen=True, kw_only=True)
class RegionMaskRequest:
    """One mask for every image of a deliverable: a rectangle or ellipse at fractions of the size."""

    region: tuple[float, float, float, float]  # x, y, w, h as fractions
    shape: str  # rect | ellipse
    width: int
    height: int


@dataclass(frozen=True, kw_only=True)
class FileMaskRequest:
    """The brief's mask image (white = repaint), identified by its bytes."""

    source: str  # the file, relative to the brief's folder (recorded; its bytes are in sha256)
    sha256: str
    file: Path | None = runtime(None)


@dataclass(frozen=True, kw_only=True)
class FaceMaskRequest:
    """One mask per image: ellipses over the faces found in it."""

    max_faces: int = 4  # per image, largest first
    detector: ModelSpec = _model("detector", FACE_DETECTOR)
    sources: tuple[Input, ...] = per_item("source", role="source")


def region_masks(req: RegionMaskRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    return [Output(region_mask((req.width, req.height), req.region, req.shape))]


def file_masks(req: FileMaskRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    import hashlib

    data = Path(req.file).read_bytes()
    if hashlib.sha256(data).hexdigest() != req.sha256:
        raise ValueError(f"mask file {req.source} changed while the run was using it")
    from atelier.inputs import decode

    return [Output(decode(data, mask=True))]  # first frame, EXIF-upright, 16-bit scaled, transparent = keep


def face_masks(req: FaceMaskRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    detector = models.face_detector(req.detector)
    out = []
    for n, src in enumerate(req.sources):
        image = load_rgb(src.path)
        found = faces.detect(detector, image, req.max_faces)
        out.append(Output(face_mask(image.size, [f.box for f in found]), face_facts(req.detector, found)))
        if on_progress:
            on_progress(n + 1, len(req.sources))
    return out


@dataclass(frozen=True, kw_only=True)
class InpaintRequest:
    prompt: str
    negative: str
    steps: int
    guidance: float
    strength: float
    scheduler: str
    ip_adapter_scale: float
    multiple: int  # the pipeline works at sizes rounded to this; the result is resized back
    model: ModelSpec = uses_model("pipeline")
    ip_adapter: ModelSpec = uses_model("ip_adapter")
    style_refs: tuple[Input, ...] = parent("style-ref")
    sources: tuple[Input, ...] = per_item("source", role="source")
    masks: tuple[Input, ...] = per_item("mask", role="mask")  # one per source; white = repaint; resized to it
    seeds: tuple[int, ...] = per_item("seed")
    batch_size: int = runtime(2)  # remote: requests in flight at once
    budget: Any = runtime(None)  # a remote model's spending limit (``atelier.backends.costs.Budget``)


def check_inpaint(req: InpaintRequest) -> None:
    if len(req.sources) != len(req.seeds):
        raise ValueError(f"{len(req.sources)} sources but {len(req.seeds)} seeds")
    if len(req.masks) != len(req.sources):
        raise ValueError(f"give one mask per source ({len(req.sources)}), got {len(req.masks)}")
    if not req.prompt.strip():
        raise ValueError("inpaint needs a prompt")
    if req.model.family == "flux" and req.multiple % 16:
        raise ValueError(f"FLUX inpaints at multiples of 16 (VAE factor 8 x 2x2 patches), got multiple={req.multiple}")


def inpaint(req: InpaintRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    check_inpaint(req)
    if req.model.kind == "remote":
        return _remote_inpaint(req, on_progress)
    # 2. Inpaint pipeline sharing the base modules, with IP-Adapter style refs
    pipe = models.pipeline(req.model, "inpaint", req.scheduler, ip_adapter=req.ip_adapter)
    pipe.set_ip_adapter_scale(req.ip_adapter_scale)
    refs = [load_rgb(r.path) for r in req.style_refs]
    dev = device()
    out = []
    for n, (src, mask_in, seed) in enumerate(zip(req.sources, req.masks, req.seeds)):
        # 3. Work at a size the pipeline accepts, then come back to the source size
        image = load_rgb(src.path)
        w, h = image.size
        ww, hh = max(req.multiple, w // req.multiple * req.multiple), max(req.multiple, h // req.multiple * req.multiple)
        with Image.open(mask_in.path) as m:
            mask = m.convert("L").resize((w, h), Image.Resampling.NEAREST)
        result = pipe(
            **prompt_kwargs(pipe, req.model.family, [req.prompt],
                            None if req.model.family == "flux" else [req.negative]),  # FLUX: no CFG
            image=image.resize((ww, hh), Image.Resampling.LANCZOS),
            mask_image=mask.resize((ww, hh), Image.Resampling.NEAREST), ip_adapter_image=[refs], width=ww, height=hh,
            strength=req.strength, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=generators([seed], dev)[0],
        ).images[0].resize((w, h), Image.Resampling.LANCZOS)
        # 4. Outside the mask the output is exactly the input
        out.append(Output(Image.composite(result, image, mask)))
        if on_progress:
            on_progress(n + 1, len(req.sources))
    return out


def _remote_inpaint(req: InpaintRequest, on_progress: Progress | None) -> list[Output]:
    """One edit-with-mask request per source (the source and its mask at the source's size, as PNG); the
    result is resized back to the source's size and composited, so outside the mask it is the source."""
    from atelier import backends

    images = [load_rgb(src.path) for src in req.sources]
    masks = []
    for image, mask_in in zip(images, req.masks):
        with Image.open(mask_in.path) as m:
            masks.append(m.convert("L").resize(image.size, Image.Resampling.NEAREST))
    refs = ()
    if req.ip_adapter.kind == "remote":  # style references as extra input images, where the API takes them
        refs = tuple(png_bytes(_thumbnail(load_rgb(r.path))) for r in req.style_refs)
    w, h = images[0].size  # the size asked for (OpenAI sends its nearest); the inpainting models follow the image
    made = backends.generate_items(req.model, req.prompt, req.negative, w, h, req.seeds,
                                   inits=tuple(png_bytes(i) for i in images), strength=req.strength, references=refs,
                                   masks=tuple(png_bytes(m) for m in masks), concurrency=req.batch_size,
                                   context="inpaint", budget=req.budget, on_progress=on_progress)
    return [Output(Image.composite(m.image().resize(image.size, Image.Resampling.LANCZOS), image, mask),
                   {"remote": m.facts}) for image, mask, m in zip(images, masks, made)]


def _thumbnail(im: Image.Image) -> Image.Image:
    im.thumbnail((1024, 1024), Image.Resampling.LANCZOS)  # a reference's style survives; megabytes need not
    return im


# ------------------------------------------------------------------------------------- face restore

@dataclass(frozen=True, kw_only=True)
class FaceRequest:
    face_size: int  # the restorer's input/output size
    max_faces: int = 4  # per image, largest first
    margin: float = 0.5  # crop = face box grown by this fraction on each side
    identity_threshold: float = faces.SAME_PERSON  # a restored face farther from the original is not used
    face: ModelSpec = uses_model("face")
    detector: ModelSpec = _model("detector", FACE_DETECTOR)
    identity: ModelSpec = _model("identity", FACE_IDENTITY)
    sources: tuple[Input, ...] = per_item("source", role="source")


def _restore_crop(net: Any, crop: Image.Image, size: int) -> Image.Image:
    import torch

    x = torch.from_numpy(np.array(crop.resize((size, size), Image.Resampling.LANCZOS))).float()
    x = (x.permute(2, 0, 1)[None] / 127.5 - 1.0).to(next(net.parameters()).device)  # (1, 3, S, S) in [-1, 1]
    with torch.no_grad():
        y = net(x, return_rgb=False, randomize_noise=False)[0]  # deterministic
    y = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(y).resize(crop.size, Image.Resampling.LANCZOS)


def restore_faces(req: FaceRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    """Each output records the detected faces (``faces``: x, y, w, h, largest first; ``face_scores``; ``detector``)
    and, per face, its identity check (``identity``: the distance between the face before and after
    restoration, and whether the restored face was used)."""
    # 1. Check inputs
    if req.max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {req.max_faces}")
    if not 0 < req.identity_threshold <= 2:
        raise ValueError(f"identity_threshold must be in (0, 2] (distances between 128-d unit-ish vectors), "
                         f"got {req.identity_threshold}")
    detector = models.face_detector(req.detector)
    out = []
    net = embedder = None
    for n, src in enumerate(req.sources):
        image = load_rgb(src.path)
        # 2. Detect
        found = faces.detect(detector, image, req.max_faces)
        result = image.copy()
        if found and net is None:
            net, embedder = models.face_restorer(req.face), models.face_embedder(req.identity)
        checks = []
        for f in found:
            x, y, w, h = f.box
            # 3. Square crop with margin, clipped to the image
            cx, cy, side = x + w / 2, y + h / 2, max(w, h) * (1 + 2 * req.margin)
            box = (max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
                   min(image.width, round(cx + side / 2)), min(image.height, round(cy + side / 2)))
            crop = image.crop(box)
            restored = _restore_crop(net, crop, req.face_size)
            # 4. Paste back through a feathered ellipse: only the face region changes
            feather = max(2, min(crop.size) // 10)
            mask = Image.new("L", crop.size, 0)
            ImageDraw.Draw(mask).ellipse([feather, feather, crop.width - feather - 1, crop.height - feather - 1], fill=255)
            candidate = result.copy()
            candidate.paste(restored, box[:2], mask.filter(ImageFilter.GaussianBlur(feather / 2)))
            # 5. Identity check: the same person before and after, else the original face stays
            dist = faces.distance(faces.embed(embedder, image, f.box), faces.embed(embedder, candidate, f.box))
            used = dist <= req.identity_threshold
            if used:
                result = candidate
            checks.append({"box": list(f.box), "distance": round(dist, 4), "restored": used})
        out.append(Output(result, {**face_facts(req.detector, found), "identity": checks,
                                   "identity_threshold": req.identity_threshold}))
        if on_progress:
            on_progress(n + 1, len(req.sources))
    return out


# ------------------------------------------------------------------------------------------ upscale
@dataclass(frozen=True, kw_only=True)
class UpscaleRequest:
    width: int  # delivered size
    height: int
    tile: int = 256  # input px per tile; bounds peak memory (tiles are padded, yet seams may differ by a level)
    fit: str = "cover-lanczos"  # x4, then a Lanczos cover-fit (centre crop of any aspect mismatch)
    model: ModelSpec = uses_model("upscale")
    sources: tuple[Input, ...] = per_item("source", role="source")


def upscale(req: UpscaleRequest, models: Models, on_progress: Progress | None = None) -> list[Output]:
    # 1. Check inputs
    if min(req.width, req.height) < 1 or req.tile < 16:
        raise ValueError(f"bad upscale request: size {req.width}x{req.height}, tile {req.tile}")
    if req.fit != "cover-lanczos":
        raise ValueError(f"unknown fit {req.fit!r}; known: cover-lanczos")
    out = []
    for n, src in enumerate(req.sources):
        image = load_rgb(src.path)
        # 2. Real-ESRGAN works in BGR uint8 (its tile loop prints per tile: kept off stdout)
        up = _enhance_with_backoff(np.asarray(image)[:, :, ::-1].copy(), req, models)
        big = Image.fromarray(np.ascontiguousarray(up[:, :, ::-1]))
        # 3. Cover-fit to the exact delivered size (centre crop of any aspect mismatch)
        out.append(Output(ImageOps.fit(big, (req.width, req.height), Image.Resampling.LANCZOS)))
        if on_progress:
            on_progress(n + 1, len(req.sources))
    return out


def _enhance_with_backoff(bgr: np.ndarray, req: UpscaleRequest, models: Models) -> np.ndarray:
    """x4 with the requested tile size; on CUDA out-of-memory, retry with half the tile (down to 32 px)."""
    import torch

    tile = req.tile
    while True:
        upsampler = models.upscaler(req.model, tile)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                up, _ = upsampler.enhance(bgr, outscale=upsampler.scale)
            return up
        except torch.OutOfMemoryError:
            if tile <= 32:
                raise
            torch.cuda.empty_cache()
            tile //= 2


MASK_REGION = Stage("mask", STAGE_VERSIONS["mask"], region_masks, kind="mask")
MASK_FILE = Stage("mask", STAGE_VERSIONS["mask"], file_masks, kind="mask")
MASK_FACES = Stage("mask", STAGE_VERSIONS["mask"], face_masks, kind="mask")
INPAINT = Stage("inpaint", STAGE_VERSIONS["inpaint"], inpaint)
FACE_RESTORE = Stage("face_restore", STAGE_VERSIONS["face_restore"], restore_faces)
UPSCALE = Stage("upscale", STAGE_VERSIONS["upscale"], upscale)
