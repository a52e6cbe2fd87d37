"""What a remote image costs: one price table per backend model, as data, with the date it was taken.

Prices change: each table says when it was read from the provider's public pricing page, and
``ATELIER_PRICES`` may name a JSON file that replaces entries (same shape as ``PRICES`` below, e.g.
``{"openai:gpt-image-1": {"taken": "2026-11-30", "per_image": {"low/1024x1024": 0.01}}}``).

A table prices an image ``per_image`` (keys ``"<quality>/<WxH>"``, ``"<WxH>"`` or ``"<quality>"``, most
specific first, then ``"*"``) or ``per_megapixel``. A model with no table costs ``None`` (unknown), never 0:
a report must not show an unknown price as free. A ComfyUI server is the studio's own: $0 per image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PriceTable:
    taken: str  # when the prices were read (YYYY-MM-DD or YYYY-MM), from the provider's public pricing page
    per_image: dict[str, float] = field(default_factory=dict)
    per_megapixel: float | None = None
    note: str = ""

    def usd(self, width: int, height: int, quality: str = "") -> float | None:
        """Dollars for one image of this size and quality, or None when the table has no such entry."""
        size = f"{width}x{height}"
        for key in (f"{quality}/{size}", size, quality, "*"):
            if key and key in self.per_image:
                return self.per_image[key]
        if self.per_megapixel is not None:
            return round(self.per_megapixel * width * height / 1e6, 6)
        return None


# Public list prices as published by the providers in mid-2025 (check them before relying on a total).
PRICES: dict[str, PriceTable] = {
    "openai:gpt-image-1": PriceTable("2025-06", per_image={
        "low/1024x1024": 0.011, "low/1024x1536": 0.016, "low/1536x1024": 0.016,
        "medium/1024x1024": 0.042, "medium/1024x1536": 0.063, "medium/1536x1024": 0.063,
        "high/1024x1024": 0.167, "high/1024x1536": 0.25, "high/1536x1024": 0.25,
    }, note="output image tokens only; an edit's input image and the prompt's text tokens add a little"),
    "openai:dall-e-3": PriceTable("2025-06", per_image={
        "standard/1024x1024": 0.04, "standard/1024x1792": 0.08, "standard/1792x1024": 0.08,
        "hd/1024x1024": 0.08, "hd/1024x1792": 0.12, "hd/1792x1024": 0.12,
    }),
    "openai:dall-e-2": PriceTable("2025-06", per_image={"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}),
    "replicate:black-forest-labs/flux-schnell": PriceTable("2025-06", per_image={"*": 0.003}),
    "replicate:black-forest-labs/flux-dev": PriceTable("2025-06", per_image={"*": 0.025}),
    "replicate:black-forest-labs/flux-1.1-pro": PriceTable("2025-06", per_image={"*": 0.04}),
    "replicate:black-forest-labs/flux-pro": PriceTable("2025-06", per_image={"*": 0.055}),
    "replicate:black-forest-labs/flux-fill-pro": PriceTable("2025-06", per_image={"*": 0.05}),
    "replicate:black-forest-labs/flux-fill-dev": PriceTable("2025-06", per_image={"*": 0.04}),
    "fal:fal-ai/flux/schnell": PriceTable("2025-06", per_megapixel=0.003),
    "fal:fal-ai/flux/dev": PriceTable("2025-06", per_megapixel=0.025),
    "fal:fal-ai/flux/dev/image-to-image": PriceTable("2025-06", per_megapixel=0.03),
    "fal:fal-ai/flux-pro/v1.1": PriceTable("2025-06", per_megapixel=0.04),
    "fal:fal-ai/flux-lora/inpainting": PriceTable("2025-06", per_megapixel=0.035),
    "fal:fal-ai/flux-pro/v1/fill": PriceTable("2025-06", per_megapixel=0.05),
    "together:black-forest-labs/FLUX.1-schnell": PriceTable("2025-06", per_megapixel=0.0027,
                                                            note="at the default 4 steps; more steps cost more"),
    "together:black-forest-labs/FLUX.1-dev": PriceTable("2025-06", per_megapixel=0.025),
    "together:black-forest-labs/FLUX.1.1-pro": PriceTable("2025-06", per_megapixel=0.04),
    "comfyui:*": PriceTable("2025-06", per_image={"*": 0.0}, note="the studio's own server: no per-image price"),
}


def price_table(source: str) -> PriceTable | None:
    """The table for ``backend:model`` (``ATELIER_PRICES`` entries first), or ``backend:*``, or None."""
    tables = dict(PRICES)
    if path := os.environ.get("ATELIER_PRICES", "").strip():
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            for name, entry in json.load(f).items():
                tables[name] = PriceTable(str(entry.get("taken", "")), dict(entry.get("per_image", {})),
                                          entry.get("per_megapixel"), str(entry.get("note", "")))
    backend = source.split(":", 1)[0]
    return tables.get(source) or tables.get(f"{backend}:*")


def estimate(source: str, width: int, height: int, quality: str = "") -> tuple[float | None, str]:
    """(dollars per image or None when unknown, the table's date) for ``source`` at this size and quality."""
    table = price_table(source)
    if table is None:
        return None, ""
    return table.usd(width, height, quality), table.taken
