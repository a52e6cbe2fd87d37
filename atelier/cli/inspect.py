"""`atelier runs`, `atelier report`, `atelier lineage`: reading the lineage store."""

from __future__ import annotations

from typing import Optional
from pathlib import Path

import typer
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
    """Where did this file come from: the ancestry chain down to prompt, seed, draft and references."""
    from atelier.report import SHOWN, lineage_dict
    from store import queries

    st = _open(home, store_url)
    with st.sessions() as s:
        asset = queries.find_asset(s, ref)
        if asset is None:
            _fail(f"{ref}: no asset with this key, key prefix or file content in {st.url}")
        data = lineage_dict(queries.ancestry(s, asset.key))
    if as_json:
        return _print_json(data)

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

    out.print(add(None, data))


