"""Prefect artifacts for a finished deliverable: the draft table, a lineage summary, links to finals.

They show up in the Prefect UI next to the flow run, so a reviewer sees what was kept and why
without opening the CLI. Built from the lineage store only (no models, no images in memory).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from atelier.report import run_report
from store import open_store, queries


def _key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def publish_deliverable(home: str, store_url: str | None, run_id: str, campaign: str, deliverable: str) -> None:
    st = open_store(Path(home), store_url)
    with st.sessions() as s:
        from store.schema import Run

        data = run_report(s, s.get(Run, run_id))["deliverables"].get(deliverable, {})
        finals = [x for stage in ("upscale", "face_restore", "inpaint", "refine") for x in data.get(stage, [])
                  if x.get("final")]
        lines = [f"# {campaign} / {deliverable} — run {run_id}", ""]
        for f in finals:
            lines.append(f"## final `{Path(f['final']).name}` ({f['width']}x{f['height']})")
            node = queries.ancestry(s, f["key"])
            while node is not None:
                a = node["asset"]
                shown = {k: a.params[k] for k in ("prompt", "seed", "steps", "scheduler", "rank", "faces")
                         if k in a.params}
                lines.append(f"- **{a.stage}** `{a.key[:12]}` {shown if shown else ''}")
                nxt = [p for p in node["parents"] if p["role"] in ("source", "init")]
                node = nxt[0] if nxt else None
            lines.append("")
    rows = [{"key": d["key"][:12], "seed": d.get("seed"), "prompt score": d.get("prompt_score"),
             "mood-board score": d.get("moodboard_score"), "total": d.get("total"),
             "kept": "✓" if d.get("kept") else "", "rank": d.get("rank")} for d in data.get("draft", [])]
    create_table_artifact(rows, key=_key(campaign, deliverable, "drafts"),
                          description=f"{deliverable}: every draft's CLIP scores and the selection")
    create_markdown_artifact("\n".join(lines), key=_key(campaign, deliverable, "lineage"),
                             description=f"{deliverable}: lineage of each final")
    for n, f in enumerate(finals, start=1):
        create_link_artifact(Path(f["final"]).resolve().as_uri(), link_text=Path(f["final"]).name,
                             key=_key(campaign, deliverable, "final", str(n)))
