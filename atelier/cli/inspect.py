"""`atelier runs`, `atelier report`, `atelier lineage`: reading the lineage store."""

from __future__ import annotations

from typing import Optional
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from atelier.cli.common import HomeOpt, JsonOpt, StoreOpt, _fail, _open, _print_json, app, out


@app.command()
def runs(home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List runs, newest first."""
    from atelier.report import run_dict
    from store import queries

    st = _open(home, store_url)
    with st.sessions() as s:
        rows = [run_dict(r) for r in queries.runs(s)]
    if as_json:
        return _print_json(rows)
    table = Table("run", "campaign", "profile", "status", "started (UTC)", "seconds")
    for r in rows:
        table.add_row(r["id"], r["campaign"], r["profile"], r["status"], r["started_at"],
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    out.print(table)


def _show_report(home, store_url, run_id: Optional[str], as_json: bool) -> None:
    from atelier.report import run_report
    from store import queries
    from store.schema import Run

    st = _open(home, store_url)
    with st.sessions() as s:
        run_row = s.get(Run, run_id) if run_id else queries.latest_run(s)
        if run_row is None:
            _fail(f"no run {run_id!r} in {st.url} (see `atelier runs`)" if run_id else "no runs yet")
        data = run_report(s, run_row)
    if as_json:
        return _print_json(data)
    r = data["run"]
    note = " [yellow]— random-weight test models: images are noise, the pipeline is real[/]" if r["random_weights"] else ""
    tree = Tree(f"[bold]run {r['id']}[/] · {r['campaign']} · profile {r['profile']} · {r['status']}{note}")
    for name, d in data["deliverables"].items():
        times = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in d["stages"].items())
        node = tree.add(f"[bold]{name}[/]  [dim]{times}[/]")
        drafts = node.add(f"drafts ({len(d.get('draft', []))})")
        for x in d.get("draft", []):
            mark = f"[green]✓ kept #{x['rank']}[/]" if x.get("kept") else ""
            score = (f"prompt {x['prompt_score']:+.3f} · mood {x['moodboard_score']:+.3f} · total {x['total']:+.3f}"
                     if "total" in x else "")
            drafts.add(f"{x['key'][:10]} seed {x['seed']} {x['width']}x{x['height']}  {score} {mark}")
        for stage in ("refine", "inpaint", "face_restore", "upscale"):
            if stage in d:
                sub = node.add(f"{stage} ({len(d[stage])})")
                for x in d[stage]:
                    extra = f" faces {len(x['faces'])}" if stage == "face_restore" else ""
                    final = f" → [cyan]{x['final']}[/]" if x.get("final") else ""
                    sub.add(f"{x['key'][:10]} {x['width']}x{x['height']}{extra}{final}")
    out.print(tree)
    cost = Table("deliverable", "device seconds", "drafts share", "vs all at full quality", title="cost (device time)")
    for name, d in data["deliverables"].items():
        c = d["cost"]
        saving = (f"{c['savings_vs_full_quality']:+.0%} saved ({c['full_quality_estimate_s']:.1f}s if every draft "
                  "were refined)" if c["savings_vs_full_quality"] is not None else "")
        cost.add_row(name, f"{c['total_s']:.2f}", f"{c['draft_share']:.0%}" if c["draft_share"] is not None else "",
                     saving)
    out.print(cost)
    table = Table("stage", "assets", "computed", "reused", "seconds", title="per stage")
    for stage, v in data["stages"].items():
        table.add_row(stage, str(v["assets"]), str(v["computed"]), str(v["reused"]), f"{v['seconds']:.2f}")
    out.print(table)


@app.command()
def report(run_id: Optional[str] = typer.Argument(None, help="run id; default the latest run"),
           home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Per deliverable: drafts → scores → kept → refined → post-edit outputs, with times per stage."""
    _show_report(home, store_url, run_id, as_json)


@app.command()
def lineage(ref: str = typer.Argument(..., help="asset key (or a unique prefix) or an image file atelier made"),
            home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Where did this file come from: the ancestry chain down to prompt, seed, draft and references.

    A file is looked up by its content in the store; a file the store does not know (a copy on another
    machine, a JPEG / WebP delivery, no store at all) is read from the lineage it carries itself
    (PNG chunk, XMP, or its ``.json`` sidecar).
    """
    from atelier import metadata
    from atelier.report import SHOWN, lineage_dict
    from atelier.settings import home_dir
    from store import open_store, queries

    # 1. The store, when there is one: it also knows paths, runs and timings.
    h, path = home_dir(home), Path(ref)
    has_store = bool(store_url) or (h / "lineage.db").exists()
    data, origin, carrier, where = None, "store", None, store_url or str(h / "lineage.db")
    if has_store:
        st = open_store(h, store_url)
        where = st.url
        with st.sessions() as s:
            asset = queries.find_asset(s, ref)
            if asset is not None:
                data = lineage_dict(queries.ancestry(s, asset.key))
    # 2. Else the lineage the file carries (a copy elsewhere, a JPEG / WebP delivery, no store at all).
    if data is None and path.is_file() and (found := metadata.read_embedded(path)) is not None:
        data, origin, carrier = metadata.lineage_tree(found.doc), "embedded metadata", found.carrier
    if data is None:
        if not path.is_file():
            _fail(f"{ref}: no asset with this key or key prefix in {where}" if has_store
                  else f"no lineage store at {where} (run a brief first, or pass --home)")
        none_carried = "the file carries no atelier lineage (PNG chunk, XMP or .json sidecar)"
        _fail(f"{ref}: no asset with this file content in {where}, and {none_carried}" if has_store
              else f"{ref}: {none_carried}, and there is no lineage store at {where}")
    if as_json:
        return _print_json({**data, "from": origin, **({"carrier": carrier} if carrier else {})})

    def add(parent: Tree | None, node: dict) -> Tree:
        params = node["params"]
        shown = ", ".join(f"{k}={params[k]!r}" for k in SHOWN.get(node["stage"], []) if k in params)
        model = (node.get("model") or {})
        model_name = model.get("name") or (model.get("pipeline") or {}).get("name")
        label = (f"[bold]{node['stage']}[/] {node['key'][:12]}" + (f" [dim]({node['role']})[/]" if node["role"] else "")
                 + (f" {node['width']}x{node['height']}" if node["width"] else "") + (f" · {shown}" if shown else "")
                 + (f" · model {model_name}" if model_name else ""))
        t = Tree(label) if parent is None else parent.add(label)
        for p in node["parents"]:
            add(t, p)
        return t

    if carrier:
        out.print(f"[dim](from embedded metadata: {escape(carrier)})[/]", highlight=False)
    out.print(add(None, data))
