"""Small helpers the stages share: image I/O, seeded generators, CLIP embedding."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def load_rgb(path: Path) -> Image.Image:
    """8-bit RGB as a person sees the file: first frame, EXIF rotation applied, 16-bit / CMYK / palette converted."""
    from atelier.inputs import to_rgb

    with Image.open(path) as im:
        return to_rgb(im)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None, compress_level: int = 6) -> bytes:
    """PNG-encode; ``text`` goes into tEXt chunks (the recipe travels inside the file)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def generators(seeds: Sequence[int], device: str) -> list:
    """One seeded ``torch.Generator`` per image, so image i depends only on seed i, not on batching."""
    import torch

    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def embed_images(clip: Any, images: Sequence[Image.Image]) -> np.ndarray:
    """CLIP image embeddings, L2-normalised: (N, D) float32."""
    import torch

    with torch.no_grad():
        x = torch.stack([clip.preprocess(im) for im in images]).to(clip.device)
        e = clip.model.encode_image(x).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return e.cpu().numpy()


def embed_texts(clip: Any, texts: Sequence[str]) -> np.ndarray:
    """CLIP text embeddings, L2-normalised: (N, D) float32."""
    import torch

    with torch.no_grad():
        e = clip.model.encode_text(clip.tokenizer(list(texts)).to(clip.device)).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return e.cpu().numpy()
