"""The unchanged re-run without Prefect: ``atelier run`` of a brief whose last run is still all in place.

An unchanged re-run through the flow makes no model call, yet took ~4.8 s of a 2-core machine, ~3 s of it
importing Prefect and running its task engine (bench/README.md, "Everyday commands"). This module lets the CLI
answer it in about a second, before Prefect or torch is imported:

1. ``fingerprint()``: what a run's results follow from, as one sha256: the brief's bytes, every input image's
   sha256 (as ``load_brief`` checked them), the effective profile (its models and settings, the brief's
   overrides applied), the options that change results (``--force``, ``--review``, the store and the asset
   location, C2PA signing) and atelier's own source (its version and a hash of its Python files: any change
   of code, a stage version included, takes the normal path).
2. ``remember()``: after a normal run completes with no review gate, the CLI stores the fingerprint in the run's
   info with what a re-run must find unchanged to reuse it: the weights every model identity of its assets came
   from (path, and size + mtime of each file: what ``atelier.sources`` caches their sha256 by) and its
   deliveries (the finals' asset files, the exported files and their sidecars: size + mtime).
3. ``check()``: the newest run of the campaign in the store is completed, has the same fingerprint and no
   gate, and every asset file, weight file and delivered file is as recorded. Anything else: the flow runs.
4. ``record()``: a new run that reuses that one (``store.lineage.record_reused_run``) and its contact sheet
   page; ``register()`` puts it in the Prefect UI as a Completed flow run through the REST API (httpx).

What it does not cover goes the normal way: briefs with review gates, ``--force`` / ``--review``, asset files
outside the home (``--assets`` URLs), ``--ephemeral`` (Prefect's temporary server keeps no UI to show the run
in), and a home whose Prefect server is not running (the normal path starts it; the next re-run is fast).
``ATELIER_FAST_RERUN=0`` turns the fast path off (every run through the flow).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from atelier import __version__
from atelier.keys import canonical

FINGERPRINT_VERSION = 1
SOURCE_PACKAGES = ("atelier", "stages", "flows", "store")  # atelier's code: ~85 files, ~0.75 MB, hashed in ~5 ms
C2PA_ENV = ("ATELIER_C2PA", "ATELIER_C2PA_CERT", "ATELIER_C2PA_KEY", "ATELIER_C2PA_ALG", "ATELIER_C2PA_TSA_URL")
FLOW_NAME = "campaign"  # flows.campaign.campaign_flow's name in Prefect


# ------------------------------------------------------------------------------------------ fingerprint
def source_digest() -> str:
    """atelier's version and the sha256 of its Python source (every stage's version constant is in it)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for package in SOURCE_PACKAGES:
        for p in sorted((root / package).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _stat(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, or None when it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _signing_files(home: Path) -> dict[str, list[int] | None]:
    """The C2PA certificate and key a delivery is signed with (``atelier.credentials.signing_config``)."""
    cert, key = os.environ.get("ATELIER_C2PA_CERT"), os.environ.get("ATELIER_C2PA_KEY")
    paths = [Path(cert), Path(key)] if cert and key else [home / "c2pa" / "test-chain.pem", home / "c2pa" / "test-key.pem"]
    return {str(p): _stat(p) for p in paths}


def fingerprint(campaign: Any, profile: str, force: str | None, review: bool, store: Any, home: Path) -> str:
    """The sha256 of what a run of ``campaign`` on ``profile`` computes and delivers (see the module's text)."""
    root = campaign.root

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    parts = {
        "version": FINGERPRINT_VERSION,
        "brief": campaign.sha256,
        "images": sorted([rel(im.path), im.sha256] for im in campaign.images),
        "profile": asdict(campaign.profile(profile)),
        "options": {"force": force, "review": review, "store": store.url, "assets": store.files.location,
                    "c2pa": {k: os.environ.get(k) for k in C2PA_ENV}, "c2pa_files": _signing_files(home)},
        "source": source_digest(),
    }
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------- what a re-run must find
def _files_stamp(path: Path) -> list:
    """[relative name, size, mtime_ns] of every file under ``path`` (as ``atelier.sources.weights_sha256``)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [[str(p.relative_to(path)) if path.is_dir() else p.name, *(_stat(p) or [None, None])] for p in files]


def _hub_ref(path: Path) -> list[str] | None:
    """A Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>/...``): [refs/main file, rev], so
    a newer download of the model (``refs/main`` moved on) is a change."""
    parts = path.parts
    if "snapshots" not in parts:
        return None
    i = parts.index("snapshots")
    ref = Path(*parts[:i]) / "refs" / "main"
    return [str(ref), parts[i + 1]] if i + 1 < len(parts) else None


def _identities(model: Any) -> list[dict]:
    """The model identities in an asset's ``model``: one (``{"name", "source", ...}``) or nested by role."""
    if not isinstance(model, dict):
        return []
    if "name" in model and "source" in model:
        return [model]
    return [x for sub in model.values() for x in _identities(sub)]


def _weights(identity: dict, prof: Any, models_dir: Path) -> list[dict]:
    """Where the weights of ``identity`` are, and their stamp; [] for a model without files (random, remote).
    KeyError when no model of the profile is that identity."""
    from atelier.profiles import ModelSpec
    from atelier.sources import resolve

    if "weights_sha256" not in identity:
        return []
    specs = [getattr(prof, f.name) for f in fields(prof) if isinstance(getattr(prof, f.name), ModelSpec)]
    spec = next(s for s in specs if (s.name, s.source) == (identity["name"], identity["source"]))
    found = [(spec, identity["weights_sha256"])]
    for lo in identity.get("loras") or []:
        found.append((next(x for x in spec.loras if (x.name, x.source) == (lo["name"], lo["source"])),
                      lo["weights_sha256"]))
    out = []
    for s, sha in found:
        path = resolve(s, models_dir)
        out.append({"name": s.name, "path": str(path), "sha256": sha, "stamp": _files_stamp(path),
                    "hub_ref": _hub_ref(path)})
    return out


def remember(store: Any, run_id: str, campaign: Any, profile: str, force: str | None, review: bool,
             home: Path) -> None:
    """Store the fingerprint of the completed run ``run_id`` with what a re-run must find (see the module)."""
    from store import lineage, queries
    from store.schema import Run

    with store.sessions() as s:
        run = s.get(Run, run_id)
        if run.status != "completed" or run.brief_sha256 != campaign.sha256 or queries.run_gates(s, run_id):
            return  # awaiting review, or the brief changed under the run: never a base to reuse
        members = queries.run_assets(s, run_id)
    prof = campaign.profile(profile)
    models: dict[str, dict] = {}
    for _, a in members:
        for identity in _identities(a.model):
            for w in _weights(identity, prof, home / "models"):
                models[w["path"]] = w
    finals = {a.key: [a.path, *(_stat(store.files.path(a.path)) or [None, None])] for ra, a in members if ra.final}
    outputs = {}
    for ra, _ in members:
        if ra.final and ra.export_path:
            for p in (Path(ra.export_path), Path(ra.export_path + ".json")):  # the file and its lineage sidecar
                outputs[str(p)] = _stat(p)
    lineage.record_fingerprint(store, run_id, {
        "digest": fingerprint(campaign, profile, force, review, store, home), "models": sorted(models.values(),
        key=lambda w: w["path"]), "finals": finals, "outputs": outputs})


@dataclass(frozen=True)
class Decision:
    """The run an unchanged re-run can reuse (None: run the flow), and why (or why not)."""

    previous: str | None
    reason: str


def check(store: Any, campaign: Any, digest: str) -> Decision:
    """Whether the newest run of the campaign can be reused as it is (see the module's text)."""
    from store import queries
    from store.files import AssetFiles

    # 1. The brief and the store
    if any(campaign.brief.review_of(d) for d in campaign.brief.deliverables):
        return Decision(None, "the brief asks for review")
    if not isinstance(store.files, AssetFiles):
        return Decision(None, f"asset files at {store.files.location}, not in the home")
    with store.sessions() as s:
        prev = queries.latest_campaign_run(s, campaign.brief.campaign)
        if prev is None:
            return Decision(None, "no earlier run of the campaign")
        if prev.status != "completed":
            return Decision(None, f"the latest run {prev.id} is {prev.status}")
        fp = (prev.info or {}).get("fingerprint") or {}
        if fp.get("digest") != digest:
            return Decision(None, f"changed since run {prev.id} (brief, inputs, profile, options or atelier)")
        if queries.run_gates(s, prev.id):
            return Decision(None, f"run {prev.id} had review gates")
        members = queries.run_assets(s, prev.id)
    # 2. Every asset file of the run, the finals as they were
    gone = [a.key for _, a in members if not store.files.exists(a.path)]
    if gone:
        return Decision(None, f"{len(gone)} asset file(s) of run {prev.id} are gone")
    now = {a.key: [a.path, *(_stat(store.files.path(a.path)) or [None, None])] for ra, a in members if ra.final}
    if now != fp.get("finals"):
        return Decision(None, f"the finals of run {prev.id} changed")
    # 3. The weights every model identity came from
    for w in fp.get("models", []):
        if _files_stamp(Path(w["path"])) != w["stamp"]:
            return Decision(None, f"the weights of {w['name']} changed")
        if w.get("hub_ref") and _read(Path(w["hub_ref"][0])) != w["hub_ref"][1]:
            return Decision(None, f"a newer download of {w['name']}")
    # 4. What was delivered
    for path, stamp in (fp.get("outputs") or {}).items():
        if stamp is None or _stat(Path(path)) != stamp:
            return Decision(None, f"{path} changed or is gone")
    return Decision(prev.id, f"unchanged since run {prev.id}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ the new run
def record(store: Any, run_id: str, previous: str, campaign: Any, task_runner: str, started_at: Any) -> Path:
    """Record ``run_id`` as a re-run of ``previous`` that reused everything, and write its contact sheet page
    (``<home>/reports/<run_id>.html``, as the flow does); returns the page."""
    from atelier.contact_sheet import render_html, sheet_data, thumbs_dir, write_page
    from store import lineage
    from store.schema import Run

    lineage.record_reused_run(store, run_id, previous, str(campaign.path), {
        "force": None, "review": False, "task_runner": task_runner,
        "model_calls": {"count": 0, "seconds": 0.0, "by_stage": {}}, "phases": {}, "device": "none",
        "fast_path": True, "reused_run": previous}, started_at)
    with store.sessions() as s:
        page = render_html(sheet_data(s, s.get(Run, run_id)), store.files.path, thumbs_dir(store.home))
    return write_page(page, store.home / "reports" / f"{run_id}.html")


def _artifact_key(*parts: str) -> str:
    """As ``flows.artifacts._key``: Prefect allows lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def register(api_url: str, parameters: dict, campaign: str, previous: str, sheet: Path,
             timeout_s: float = 10.0) -> str | None:
    """A Completed flow run of the campaign flow, with the run's contact-sheet link, on the Prefect server at
    ``api_url`` (REST: POST /flows/, /flow_runs/, /artifacts/; ``PREFECT_API_KEY`` is sent when set). The
    server names the flow run, as it names the flow's own. Returns None, or what went wrong in a few words."""
    import httpx

    headers = {"Authorization": f"Bearer {os.environ['PREFECT_API_KEY']}"} if os.environ.get("PREFECT_API_KEY") else {}
    run_id = parameters["run_id"]
    try:
        # verify: certificates only for https (loading the CA bundle costs ~0.2 s: most of this function's time)
        with httpx.Client(base_url=api_url.rstrip("/") + "/", headers=headers, timeout=timeout_s,
                          verify=not api_url.startswith("http://")) as client:
            flow = client.post("flows/", json={"name": FLOW_NAME})
            flow.raise_for_status()
            flow_run = client.post("flow_runs/", json={
                "flow_id": flow.json()["id"], "parameters": parameters,
                "state": {"type": "COMPLETED", "name": "Completed",
                          "message": f"unchanged since run {previous}: everything reused, no task ran "
                                     "(atelier's re-run fast path)"}})
            flow_run.raise_for_status()
            link = sheet.resolve().as_uri()
            client.post("artifacts/", json={
                "key": _artifact_key(campaign, "contact-sheet"), "type": "markdown", "data": f"[{sheet.name}]({link})",
                "description": f"run {run_id}: the HTML contact sheet (self-contained)",
                "flow_run_id": flow_run.json()["id"]}).raise_for_status()
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None

