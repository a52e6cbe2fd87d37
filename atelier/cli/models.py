"""`atelier models`: every model spec of every profile, and whether its weights are on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from atelier.cli.common import HomeOpt, JsonOpt, _print_json, app, out
from atelier.settings import home_dir, prepare_environment

ROLES = ("draft_model", "refine_model", "inpaint_model", "ip_adapter", "clip", "face", "upscale", "face_detector",
         "face_identity", "safety_model")  # the last three: real weights inside packages, the same in every profile


AVAILABILITY_CACHE = "availability.json"  # under <home>/models


def _hub_id(source: str) -> bool:
    """Whether ``sources.resolve`` looks ``source`` up in the Hugging Face cache (``org/name``)."""
    return ("/" in source and ":" not in source.split("/")[0] and not source.startswith(("/", "~", "."))
            and not Path(source).expanduser().exists())


def _slow_to_check(spec: Any) -> bool:
    """Whether ``sources.available`` needs a heavy import for ``spec``: open_clip (and so torch, ~7 s) for an
    open_clip pretrained tag, huggingface_hub's API (~1-2 s) for a model or LoRA in the Hugging Face cache."""
    if spec.kind == "remote":
        return False
    if spec.kind == "open-clip":
        return bool(spec.pretrained) and not Path(spec.source).expanduser().exists()
    return _hub_id(spec.source) or any(_hub_id(lo.source) for lo in spec.loras)


def _stamp(spec: Any) -> list:
    """What such an answer depends on: open_clip's version (its tag → repo table), the HF cache folder and its
    mtime (a download adds a ``models--*`` folder), and the snapshots folder of each repo named."""
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub.constants import HF_HUB_CACHE

    def mtime(p: Path) -> Optional[int]:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return None

    try:
        oc = version("open_clip_torch")
    except PackageNotFoundError:
        oc = None
    hub = Path(HF_HUB_CACHE)
    repos = [s for s in (spec.source, *(lo.source for lo in spec.loras)) if _hub_id(s)]
    return [oc, str(hub), mtime(hub), *(mtime(hub / f"models--{r.replace('/', '--')}" / "snapshots") for r in repos)]


def _available(spec: Any, models_dir: Path, cache: dict) -> tuple[bool, str]:
    """``sources.available``; where that needs a heavy import, answered from ``<models>/availability.json``
    while the answer's stamp holds and the file or folder it found still exists."""
    from atelier.sources import available

    if not _slow_to_check(spec):
        return available(spec, models_dir)
    key, stamp = f"{spec.kind}:{spec.source}:{spec.arch}:{spec.pretrained}:{[lo.source for lo in spec.loras]}", _stamp(spec)
    hit = cache.get(key)
    if hit and hit["stamp"] == stamp and (not hit["ok"] or Path(hit["where"]).exists()):
        return hit["ok"], hit["where"]
    ok, where = available(spec, models_dir)
    cache[key] = {"stamp": stamp, "ok": ok, "where": where}
    return ok, where


def model_rows(models_dir: Path, hashes: bool = False) -> list[dict]:
    """One row per profile and role; ``hashes``: with the sha256 of each local model's weights (hashed once,
    then cached by size + mtime in ``<models>/weights-sha256.json``)."""
    from atelier.profiles import PROFILES

    cache_file = models_dir / AVAILABILITY_CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    before = json.dumps(cache, sort_keys=True)
    rows, seen = [], {}
    for prof in PROFILES.values():
        for role in ROLES:
            spec = getattr(prof, role)
            if spec is None:  # inpaint_model unset: inpaint uses the refine model
                continue
            if spec not in seen:
                seen[spec] = _available(spec, models_dir, cache)
            ok, where = seen[spec]
            rows.append({"profile": prof.name, "role": role.removesuffix("_model"), "name": spec.name,
                         "kind": spec.kind, "source": spec.source, "loras": [lo.source for lo in spec.loras],
                         "available": ok, "where": where})
            if hashes:
                rows[-1]["weights_sha256"] = _weights_sha256(spec, models_dir) if ok else None
    if json.dumps(cache, sort_keys=True) != before and models_dir.is_dir():
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    return rows


def _weights_sha256(spec: Any, models_dir: Path) -> Optional[str]:
    """The weights hash lineage records for ``spec`` (None for a remote backend or an in-memory random model)."""
    from atelier.sources import identity

    if spec.kind == "remote" or spec.source.startswith("random:"):
        return None
    try:
        return identity(spec, models_dir).get("weights_sha256")
    except (OSError, ValueError):  # ModelUnavailable is an OSError: shown as not available already
        return None


@app.command()
def models(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           profile: Optional[str] = typer.Option(None, "--profile", help="only this profile"),
           hashes: bool = typer.Option(False, "--hashes", help="also the sha256 of each local model's weights (what "
                                       "lineage records; hashed once, then cached by size and mtime)")) -> None:
    """List every profile's models and whether each is available locally."""
    h = home_dir(home)
    prepare_environment(h, offline_models=True)
    rows = [r for r in model_rows(h / "models", hashes=hashes) if profile in (None, r["profile"])]
    if as_json:
        return _print_json(rows)
    from rich.table import Table

    from atelier.profiles import PROFILES

    table = Table("profile", "role", "model", "source", "local", *(("weights sha256",) if hashes else ()),
                  title="models (offline: nothing is downloaded)")
    hints: dict[str, str] = {}
    for r in rows:
        source = r["source"] + "".join(f" + {lo}" for lo in r["loras"])
        table.add_row(r["profile"], r["role"], r["name"], source, "[green]yes[/]" if r["available"] else "[red]no[/]",
                      *(((r["weights_sha256"] or "")[:12],) if hashes else ()))
        if not r["available"]:
            hints[r["name"]] = r["where"]
    out.print(table)
    for p in PROFILES.values():
        if profile in (None, p.name):
            out.print(f"[bold]{p.name}[/]: {p.description}")
    for name, hint in hints.items():
        out.print(f"[red]missing[/] {name}: {hint}", soft_wrap=True)
