"""Content keys: an asset's identity is the hash of its recipe, and it doubles as the cache key.

key = sha256(stage, stage version, params, parent keys with roles, model identity). Two runs that
would compute the same thing get the same key, so the second one reuses the first's file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def asset_key(stage: str, version: int, params: dict, parents: Iterable[tuple[str, str]], model: dict | None) -> str:
    payload = {"stage": stage, "version": version, "params": params,
               "parents": [list(p) for p in parents], "model": model}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:32]


def derive_seed(base: int, *parts: object) -> int:
    """A per-image seed from the brief's base seed and a path (deliverable, index): stable, 31-bit."""
    digest = hashlib.sha256(canonical([base, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
