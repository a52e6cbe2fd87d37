"""The stage protocol: what a stage produces, from what, and the key of each product.

A stage is a module with a frozen request dataclass and an entry function ``run(req, models,
on_progress=None) -> list[Output]`` (one output per item), declared as a ``Stage``. The request's fields
say, through their metadata, what each one is to the product's identity:

- ``per_item("seed")``: a tuple with one value per output (seeds, init images); item i gets value i
  under the singular name given;
- ``parent("init")``: an input asset (``Input``: key + path) or a tuple of them; its *key* goes into the
  item's parents with that role, its path never goes into a key;
- ``uses_model("pipeline")``: a ``ModelSpec``; its identity (weights hash) goes into the key, under that name;
- ``runtime()``: how the work is done, not what it produces (batch size): left out of the key;
- any other field is part of the recipe, as it is.

``plan(stage, req, identify)`` turns a request into ``Item``s, each with the recipe it records, its parents
and its key = ``asset_key(stage, version, recipe, parents, model identity)``. The key is computed from the
very object the stage runs on, so nothing that changes an output can be left out of it (tests/test_protocol.py
changes every field of every stage's request and checks the keys move).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from atelier.keys import asset_key
from atelier.profiles import ModelSpec

Progress = Callable[[int, int], None]  # (done, total); stages report through it, UIs live elsewhere


@dataclass(frozen=True)
class Input:
    """An input asset: its key (identity, goes into keys) and where its file is (never in a key)."""

    key: str
    path: Path


@dataclass(frozen=True)
class Output:
    """One item's product: the image, and facts measured while making it (e.g. face boxes) to record."""

    image: Image.Image
    facts: dict = field(default_factory=dict)


def per_item(name: str, role: str | None = None) -> Any:
    """A tuple field with one value per output item, recorded as ``name`` (or as a parent with ``role``)."""
    return field(metadata={"per_item": name, "role": role})


def parent(role: str) -> Any:
    """An input asset (or a tuple of them) shared by every item, recorded as a parent with ``role``."""
    return field(metadata={"role": role})


def uses_model(name: str) -> Any:
    """A ``ModelSpec`` whose identity goes into every item's key under ``name``."""
    return field(metadata={"model": name})


def runtime(default: Any) -> Any:
    """How the work runs (batch size, ...), not what it makes: never part of a key."""
    return field(default=default, metadata={"runtime": True})


@dataclass(frozen=True)
class Stage:
    """A stage as the executor sees it: its name (the asset's ``stage``), version and entry function."""

    name: str
    version: int
    run: Callable[..., list]
    kind: str = "image"  # what its assets are: image | mask
    batch_field: str | None = None  # the request's batch-size field, halved after CUDA out-of-memory


@dataclass(frozen=True)
class Item:
    key: str
    recipe: dict  # what the asset records as its params (and its key hashes)
    parents: tuple[tuple[str, str], ...]  # (parent key, role)
    model: dict | None  # the model identity in the key


def items_of(req: Any) -> int:
    """How many outputs ``req`` asks for: the length of its per-item fields (1 when it has none set)."""
    lengths = {len(getattr(req, f.name)) for f in fields(req) if f.metadata.get("per_item")}
    lengths.discard(0)
    if len(lengths) > 1:
        raise ValueError(f"{type(req).__name__}: per-item fields of different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 1


def plan(stage: Stage, req: Any, identify: Callable[[ModelSpec], dict]) -> list[Item]:
    """The items ``req`` produces, each with its recipe, parents, model identity and key."""
    n = items_of(req)
    shared: dict[str, Any] = {}
    shared_parents: list[tuple[str, str]] = []
    models: dict[str, dict] = {}
    per: list[dataclasses.Field] = []
    for f in fields(req):
        value, meta = getattr(req, f.name), f.metadata
        if meta.get("runtime"):
            continue
        if meta.get("per_item"):
            per.append(f)
        elif "model" in meta:
            if value is not None:
                models[meta["model"]] = identify(value)
        elif meta.get("role"):
            shared_parents += [(i.key, meta["role"]) for i in _inputs(value)]
        else:
            shared[f.name] = _plain(value)
    model_id = None if not models else next(iter(models.values())) if len(models) == 1 else models
    out = []
    for i in range(n):
        recipe, parents = dict(shared), []
        for f in per:
            values = getattr(req, f.name)
            if not values:
                continue
            if f.metadata.get("role"):
                parents += [(x.key, f.metadata["role"]) for x in _inputs(values[i])]
            else:
                recipe[f.metadata["per_item"]] = _plain(values[i])
        parents = tuple(parents) + tuple(shared_parents)
        out.append(Item(asset_key(stage.name, stage.version, recipe, parents, model_id), recipe, parents, model_id))
    return out


def subset(req: Any, indices: Sequence[int]) -> Any:
    """``req`` restricted to the items at ``indices`` (the ones not stored yet)."""
    changes = {f.name: tuple(getattr(req, f.name)[i] for i in indices)
               for f in fields(req) if f.metadata.get("per_item") and getattr(req, f.name)}
    return dataclasses.replace(req, **changes)


def _inputs(value: Any) -> list[Input]:
    if value is None:
        return []
    if isinstance(value, Input):
        return [value]
    return [v for v in value if v is not None]


def _plain(value: Any) -> Any:
    """A recipe value as JSON holds it (tuples become lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"a path cannot be part of a recipe ({value}): declare the field parent() or runtime()")
    return value
