"""Prefect artifacts for a finished deliverable, and the run's HTML contact sheet in the home.

After each deliverable (``publish_deliverable``), the Prefect UI gets the deliverable's part of the sheet
as Markdown (mood board, draft grid with scores and the kept ones marked, finals with their lineage), the
draft table, and links to the finals. Once per run (``publish_run``), the run's contact sheet is written
to ``<home>/reports/<run_id>.html`` (``atelier.contact_sheet``) and linked.
Built from the lineage store only (no models, no images in memory beyond thumbnails, which are cached by
content under ``<home>/cache/thumbs``).

A deliverable's artifacts that an earlier run already published with the same content (its run id aside) to
the same Prefect API are not sent again (``Published``): an unchanged re-run spent ~0.5-1 s of its ~2 s flow
sending copies. The run's own contact-sheet link is always sent (it names the run's page).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from atelier.contact_sheet import markdown_sheet, render_html, sheet_data, thumbs_dir, write_page
from store import Store


def _key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


class Published:
    """What this home last published to a Prefect API, per artifact key: the sha256 of the content with the run
    id taken out, in ``<home>/cache/prefect-artifacts.json``. Another API URL (``PREFECT_API_URL``, another
    server) starts afresh; a temporary server (``--ephemeral``: no URL) always gets everything."""

    def __init__(self, home: Path, run_id: str) -> None:
        from prefect.settings import PREFECT_API_URL

        self.path, self.run_id, self.api_url = home / "cache" / "prefect-artifacts.json", run_id, PREFECT_API_URL.value()
        try:
            seen = json.loads(self.path.read_text())
        except (OSError, ValueError):
            seen = {}
        self.digests: dict[str, str] = seen.get("digests", {}) if seen.get("api_url") == self.api_url else {}
        self.changed = False

    def needed(self, key: str, *content: Any) -> bool:
        """Whether artifact ``key`` with ``content`` must be sent (then it counts as sent: call ``save`` after)."""
        text = json.dumps(content, sort_keys=True, default=str).replace(self.run_id, "")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.api_url and self.digests.get(key) == digest:
            return False
        self.digests[key], self.changed = digest, True
        return True

    def save(self) -> None:
        if not (self.api_url and self.changed):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"api_url": self.api_url, "digests": self.digests}, indent=1))
        os.replace(tmp, self.path)  # concurrent runs: the last one wins, the other's keys are sent again next time


def publish_deliverable(st: Store, run_id: str, campaign: str, deliverable: str) -> None:
    """Publish one deliverable's artifacts (those whose content changed since this home last published them)."""
    from store.schema import Run

    with st.sessions() as s:
        data = sheet_data(s, s.get(Run, run_id), only=deliverable)
    d = data["deliverables"].get(deliverable, {"finals": [], "moodboard": []})
    rounds = d.get("rounds") or [{"round": 0, "candidates": d.get("draft", [])}]
    rows = [{"round": rd["round"], "key": x["key"][:12], "seed": x.get("seed"), "prompt score": x.get("prompt_score"),
             "mood-board score": x.get("moodboard_score"), "total": x.get("total"),
             "kept": "✓" if x.get("kept") else "", "rank": x.get("rank"),
             "picked": f"#{x['picked']} {x.get('picked_by')}" if x.get("picked") else "",
             "stars": (x.get("rating") or {}).get("stars"), "rejected": "✗" if (x.get("rating") or {}).get("rejected")
             else ""} for rd in rounds for x in rd["candidates"]]
    published = Published(st.home, run_id)
    key = _key(campaign, deliverable, "drafts")
    description = (f"{deliverable}: every candidate's CLIP scores (drafts, then each round's variations), CLIP's "
                   "selection, a person's picks and ratings")
    if published.needed(key, rows, description):
        create_table_artifact(rows, key=key, description=description)
    if deliverable in data["deliverables"]:
        sheet = markdown_sheet(data, st.files.path, deliverable, thumbs_dir(st.home))
        key = _key(campaign, deliverable, "sheet")
        description = f"{deliverable}: contact sheet (mood board, drafts, finals and lineage)"
        if published.needed(key, sheet, description):
            create_markdown_artifact(sheet, key=key, description=description)
    for n, f in enumerate(d["finals"], start=1):
        link, key = Path(f["final"]).resolve().as_uri(), _key(campaign, deliverable, "final", str(n))
        if published.needed(key, link):
            create_link_artifact(link, link_text=Path(f["final"]).name, key=key)
    published.save()


def publish_run(st: Store, run_id: str, campaign: str) -> Path:
    """Write the run's HTML contact sheet into the home and link it; returns its path."""
    from store import lineage
    from store.schema import Run

    with st.sessions() as s:
        data = sheet_data(s, s.get(Run, run_id))
        # written as the run's last step, just before its end is recorded: show the status it ends with
        data["run"]["status"] = lineage.AWAITING if lineage.pending_gates(s, run_id) else "completed"
    sheet = write_page(render_html(data, st.files.path, thumbs_dir(st.home)), st.home / "reports" / f"{run_id}.html")
    create_link_artifact(sheet.resolve().as_uri(), link_text=sheet.name, key=_key(campaign, "contact-sheet"),
                         description=f"run {run_id}: the HTML contact sheet (self-contained)")
    return sheet


def gates_markdown(st: Store, run_id: str) -> str | None:
    """The run's open review gates as Markdown: per gate its candidates, CLIP's scores and suggestion, and how
    to decide. None when nothing awaits review."""
    from atelier.review import open_gates

    gates = open_gates(st, run_id)
    if not gates:
        return None
    lines = [f"# Run {run_id} awaits review", ""]
    for g in gates:
        lines += [f"## {g.deliverable} · round {g.round}", "",
                  "| # | CLIP rank | total | prompt fit | mood-board fit | CLIP keeps | file |",
                  "|---|---|---|---|---|---|---|"]
        for c in g.candidates:
            lines.append(f"| {c.number} | {c.clip_rank or ''} | {c.total:.3f} | {c.prompt_score:.3f} | "
                         f"{c.moodboard_score:.3f} | {'✓' if c.clip_kept else ''} | `{Path(c.path).name}` |"
                         if c.total is not None else f"| {c.number} | | | | | | `{Path(c.path).name}` |")
        keep = ",".join(map(str, g.suggestion))
        lines += ["", f"Decide: `atelier review {run_id} --deliverable {g.deliverable} --keep {keep} --resume` "
                      f"(or `atelier review {run_id} --serve` for a page to click)", ""]
    return "\n".join(lines)


def publish_gates(st: Store, run_id: str, campaign: str) -> bool:
    """A Markdown artifact of what awaits review (True if anything does)."""
    text = gates_markdown(st, run_id)
    if text is None:
        return False
    create_markdown_artifact(text, key=_key(campaign, "awaiting-review"),
                             description=f"run {run_id}: candidates awaiting a person's decision")
    return True
