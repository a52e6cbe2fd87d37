"""`atelier runs`, `atelier report`, `atelier lineage`: reading the lineage store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from atelier.cli.common import HomeOpt, JsonOpt, StoreOpt, _fail, _open, _print_json, app, out


@app.command()
def runs(home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
         awaiting: bool = typer.Option(False, "--awaiting", help="only runs that await a person's review, with what "
                                                                 "they wait for")) -> None:
    """List runs, newest first."""
    from atelier.report import run_dict
    from store import lineage, queries

    st = _open(home, store_url)
    with st.sessions() as s:
        rows = [run_dict(r) for r in queries.runs(s) if not awaiting or r.status == lineage.AWAITING]
        if awaiting:
            for r in rows:
                r["awaiting"] = [{"deliverable": g.deliverable, "round": g.round, "candidates": len(g.candidates)}
                                 for g in lineage.pending_gates(s, r["id"])]
    if as_json:
        return _print_json(rows)
    if awaiting:
        if not rows:
            out.print("no run awaits review")
            return
        table = Table("run", "campaign", "started (UTC)", "awaits review for")
        for r in rows:
            table.add_row(r["id"], r["campaign"], r["started_at"], ", ".join(
                f"{g['deliverable']} (round {g['round']}, {g['candidates']} candidates)" for g in r["awaiting"])
                or "decided: resume it")
        out.print(table)
        return
    table = Table("run", "campaign", "profile", "status", "started (UTC)", "seconds")
    for r in rows:
        table.add_row(r["id"], r["campaign"], r["profile"], r["status"], r["started_at"],
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    out.print(table)


def _show_report(home: Any, store_url: Any, run_id: Optional[str], as_json: bool, html: Optional[Path] = None) -> None:
    from atelier.report import run_report
    from store import queries
    from store.schema import Run

    if html is not None and not html.parent.is_dir():
        _fail(f"--html: {html}: folder {html.parent} does not exist")
    st = _open(home, store_url)
    with st.sessions() as s:
        run_row = s.get(Run, run_id) if run_id else queries.latest_run(s)
        if run_row is None:
            _fail(f"no run {run_id!r} in {st.url} (see `atelier runs`)" if run_id else "no runs yet")
        data = run_report(s, run_row)
        if html is not None:
            from atelier.contact_sheet import render_html, sheet_data, thumbs_dir, write_page

            write_page(render_html(sheet_data(s, run_row), st.files.path, thumbs_dir(st.home)), html)
    if as_json:
        return _print_json({**data, **({"html": str(html)} if html is not None else {})})
    _print_report(data, st.home)
    if html is not None:
        out.print(f"contact sheet: {escape(str(html))}", highlight=False)


def _print_report(data: dict, home: Path) -> None:
    """Per deliverable a tree (mood board → drafts → selection → [variations → selection]... → each stage →
    finals, or what awaits review), then the run's summary tables."""
    r = data["run"]
    out.print(f"[bold]run {r['id']}[/] · {escape(r['campaign'])} · profile {r['profile']} · {r['status']}",
              highlight=False)
    if r["random_weights"]:
        out.print("[yellow]random-weight test models: images are noise, the pipeline is real[/]")
    elif r.get("models_note"):
        out.print(f"[dim]{escape(r['models_note'])}[/]", highlight=False)
    for name, d in data["deliverables"].items():
        out.print(_deliverable_tree(name, d, home))
    if any(x.get("picked") or x.get("rating") for d in data["deliverables"].values() for rd in d.get("rounds", [])
           for x in rd["candidates"]):
        out.print("[dim]✓ kept: CLIP's selection · ◆ picked: a person's decision · ★ / ✗: the latest rating[/]")
    for a in data.get("awaiting", []):
        how = ("decided: resume it" if a["status"] == "decided"
               else f"CLIP suggests {','.join(map(str, a['suggestion']))}")
        out.print(f"[yellow]awaiting review:[/] {escape(a['deliverable'])} · round {a['round']} · "
                  f"{a['candidates']} candidates · {how} (atelier review {r['id']})", highlight=False)
    summary = Table("deliverable", "drafts", "kept", "finals", "wall s", "device s", "saved", title="summary")
    for name, d in data["deliverables"].items():
        c = d["cost"]
        rounds = d.get("rounds") or []
        kept = len(rounds[-1]["goes_on"]) if rounds else sum(1 for x in d.get("draft", []) if x.get("kept"))
        summary.add_row(name, str(len(d.get("draft", []))) + (f" +{len(d.get('vary', []))}" if d.get("vary") else ""),
                        str(kept), str(len(d["finals"])) if not d.get("awaiting") else "awaiting",
                        f"{sum(v['seconds'] for v in d['stages'].values()):.1f}", f"{c['total_s']:.1f}",
                        f"{c['savings_vs_full_quality']:+.0%}" if c["savings_vs_full_quality"] is not None else "")
    out.print(summary)
    out.print("[dim]saved: device time vs refining every draft at full quality[/]")
    table = Table("stage", "assets", "computed", "reused", "seconds", title="per stage")
    for stage, v in data["stages"].items():
        table.add_row(stage, str(v["assets"]), str(v["computed"]), str(v["reused"]), f"{v['seconds']:.2f}")
    out.print(table)
    if data.get("dollars"):
        _print_dollars(data["dollars"], list(data["deliverables"]))


def _print_dollars(dol: dict, deliverables: list[str]) -> None:
    """What the run's hosted-backend requests cost: per deliverable (by stage), what reuse and drafting cheap
    saved, the run's total, and the date of each price table used."""
    from atelier.backends.costs import money

    def stages(by: dict) -> str:
        return " · ".join(f"{st} {money(v)}" for st, v in by.items())

    table = Table("deliverable", "spent", "by stage", "reuse saved", "drafting cheap saved", title="dollars")
    for name in dict.fromkeys([*deliverables, *dol["by_deliverable"], *dol["saved_by_deliverable"]]):
        ds = dol["drafting_saving"].get(name)
        table.add_row(name, money(dol["by_deliverable"].get(name, 0.0)), stages(dol["by_deliverable_stage"].get(name, {})),
                      money(dol["saved_by_deliverable"].get(name, 0.0)),
                      f"{money(ds['saving'])} of {money(ds['all_at_refine_price'])}" if ds else "")
    ds = dol["drafting_saving"].values()
    table.add_row("[bold]run[/]", f"[bold]{money(dol['usd'])}[/]", stages(dol["by_stage"]), money(dol["saved_by_reuse"]),
                  f"{money(sum(x['saving'] for x in ds))} of {money(sum(x['all_at_refine_price'] for x in ds))}" if ds else "")
    out.print(table)
    out.print("[dim]spent: requests this run sent · reuse saved: what its reused assets cost when they were made "
              "(a re-run of an unchanged brief costs $0) · drafting cheap saved: finishing every candidate at the "
              "refine price instead, minus what drafts and refines cost[/]")
    if dol["unknown_priced"]:
        out.print(f"[yellow]{dol['unknown_priced']} remote asset(s) from a backend with no price table: not counted[/]")
    tables = ", ".join(f"{src} ({taken or 'no table'})" for src, taken in dol["price_tables"].items())
    out.print(f"[dim]prices: {escape(tables)}: list prices as of those dates, estimates to verify against the "
              "providers' pricing pages (ATELIER_PRICES overrides them)[/]", highlight=False)


def _stars(rating: dict | None) -> str:
    """A rating's marks: ★★★★☆ and / or ✗ rejected (empty without a rating)."""
    if not rating:
        return ""
    text = ("★" * rating["stars"] + "☆" * (5 - rating["stars"])) if rating.get("stars") else ""
    return " ".join(x for x in (f"[yellow]{text}[/]" if text else "", "[red]✗ rejected[/]" if rating.get("rejected")
                                else "") if x)


def _deliverable_tree(name: str, d: dict, home: Path) -> Tree:
    from atelier.report import candidate_names

    wall = sum(v["seconds"] for v in d["stages"].values())
    tree = Tree(f"[bold]{escape(name)}[/] · {wall:.1f} s wall · {d['cost']['total_s']:.1f} s device", guide_style="dim")
    refs = ", ".join(Path(str(x["source"])).name for x in d["moodboard"])
    tree.add(f"mood board · {len(d['moodboard'])} refs: {escape(refs)}")
    per_stage_cost = d["cost"]["per_stage_s"]
    rounds = d.get("rounds") or []
    multi = len(rounds) > 1 or any(x["gate"] for x in rounds)
    names = candidate_names(d)  # key -> how a line names it: #2 (a draft), r1.3 (round 1's third candidate)

    def line(label: str, count: str, seconds: float, cost: float, reused: int = 0) -> str:
        return f"[bold]{label}[/] {count} · {seconds:.1f} s · cost {cost:.1f} s" + (f" · {reused} reused" if reused else "")

    for rd in rounds:
        n, suffix = rd["round"], f" r{rd['round']}" if multi else ""
        cands = rd["candidates"]
        if n == 0:
            st = d["stages"].get("draft", {})
            node = tree.add(line("drafts", str(len(cands)), rd["seconds"].get("draft", st.get("seconds", 0)),
                                 rd["cost_s"]["draft"], st.get("reused", 0)))
        else:
            node = tree.add(line(f"variations r{n}", f"· {len(cands)} · strength {rd['strength']}",
                                 rd["seconds"].get("vary", 0), rd["cost_s"]["vary"]))
        for x in cands:
            score = (f" · prompt {x['prompt_score']:+.3f} · mood {x['moodboard_score']:+.3f}" if "total" in x else "")
            src = names.get(x.get("from"), (x.get("from") or "")[:10])
            head = f"#{x['index']}" if n == 0 else f"{names[x['key']]} ← {src} ·"
            node.add(f"{head} seed {x['seed']}{score}{_usd(x)}{_marks(x)}")
        sel = d["stages"].get("select", {})
        sel_seconds = (rd["seconds"].get("select", sel.get("seconds", 0) if not multi else 0)
                       + rd["seconds"].get("pick", 0))
        clip = "CLIP suggested" if rd["gate"] else "CLIP kept"
        node = tree.add(line(f"selection{suffix}", f"· {clip} {len(rd['clip_kept'])} of {len(cands)}" if multi
                             else str(len(rd["clip_kept"])),
                             sel_seconds, rd["cost_s"]["select"] + rd["cost_s"]["pick"],
                             0 if multi else sel.get("reused", 0)))
        gate, review = rd["gate"], rd["review"]
        if review and (rd["picks"] or (gate and gate["status"] == "decided")):
            kept = ", ".join(names.get(k, k[:10]) for k in review["kept"])
            rej = f" · rejected {', '.join(names.get(k, k[:10]) for k in review['rejected'])}" if review["rejected"] else ""
            note = f": {escape(review['note'])}" if review["note"] else ""
            state = "" if rd["picks"] else " [yellow](resume to go on)[/]"
            node.add(f"[magenta]◆ {escape(review['by'])} kept {kept}[/]{rej}{note}{state}")
        if gate and gate["status"] == "awaiting":
            node.add("[yellow]awaiting a person's decision[/]")
    # Each chain in the order of what the last selection kept (the person's order, else CLIP's rank).
    last = rounds[-1] if rounds else None
    going = ([p["key"] for p in last["picks"]] or [x["key"] for x in sorted(
        (x for x in d.get("select", []) if (x.get("round") or 0) == last["round"]), key=lambda x: x.get("rank") or 99)]
             ) if last else []
    rank = {k: i for i, k in enumerate(going)}
    for stage in ("refine", "inpaint", "face_restore", "upscale"):
        for x in d.get(stage, []):
            rank[x["key"]] = rank.get(x.get("from"), 99)
    for stage in ("refine", "inpaint", "face_restore", "upscale"):
        if stage not in d:
            continue
        st = d["stages"].get(stage, {})
        node = tree.add(line(stage, str(len(d[stage])), st.get("seconds", 0), per_stage_cost.get(stage, 0),
                             st.get("reused", 0)))
        for x in sorted(d[stage], key=lambda x: (rank.get(x["key"], 99), x["key"])):
            src = names.get(x.get("from"), (x.get("from") or "")[:10])
            extra = f" · faces {len(x['faces'])}" if stage == "face_restore" else ""
            node.add(f"{x['key'][:10]} ← {src} · {x['width']}x{x['height']}{extra}{_usd(x)}{_marks(x)}")
            names[x["key"]] = x["key"][:10]
    if d.get("awaiting"):
        a = d["awaiting"]
        tree.add(f"[bold yellow]awaiting review[/] · round {a['round']} · {a['candidates']} candidates · "
                 + ("decided: resume the run" if a["status"] == "decided"
                    else f"CLIP suggests {','.join(map(str, a['suggestion']))}"))
        return tree
    finals = tree.add(f"[bold]finals[/] {len(d['finals'])}")
    for x in sorted(d["finals"], key=lambda x: x["final"]):
        finals.add(f"[cyan]{escape(_rel(x['final'], home))}[/] ← {x['key'][:10]} · {x['width']}x{x['height']}"
                   f"{_marks({'rating': x.get('rating')})}")
    return tree


def _usd(x: dict) -> str:
    """`` · $0.042`` for a remote asset (what its request cost by the price table; ``, reused: $0`` when this run
    reused it), empty for a local one."""
    from atelier.backends.costs import money

    if "usd" not in x:
        return ""
    return f" · {money(x['usd'])}" + (", reused: $0" if x["usd"] and not x.get("usd_this_run") else "")


def _marks(x: dict) -> str:
    """CLIP's kept mark, the person's pick, and the latest rating of a candidate."""
    marks = []
    if x.get("kept"):
        marks.append(f"[green]✓ kept #{x['rank']}[/]")
    if x.get("picked"):
        marks.append(f"[magenta]◆ picked #{x['picked']} by {escape(str(x.get('picked_by')))}[/]")
    if stars := _stars(x.get("rating")):
        marks.append(stars)
    return (" " + " ".join(marks)) if marks else ""


def _rel(path: str, home: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(home).resolve()))
    except ValueError:
        return path


@app.command()
def report(run_id: Optional[str] = typer.Argument(None, help="run id; default the latest run"),
           home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
           html: Optional[Path] = typer.Option(None, "--html", help="also write the run's contact sheet (HTML)"),
           ) -> None:
    """Per deliverable: mood board → drafts (scores, kept) → refined → post-edit → finals; time and cost."""
    _show_report(home, store_url, run_id, as_json, html)


@app.command()
def lineage(ref: str = typer.Argument(..., help="asset key (or a unique prefix) or an image file atelier made"),
            home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Where did this file come from: the ancestry down to the roots, with what changed at each step.

    A file is looked up by its content in the store, else by the key it carries (a signed delivery);
    a file the store does not know (a copy on another machine, a JPEG / WebP delivery, no store at
    all) is read from the lineage it carries itself (PNG chunk, XMP, or its ``.json`` sidecar).
    A file with C2PA content credentials also shows them, validated.
    """
    from atelier import metadata
    from atelier.report import annotate_changes, annotate_rounds, lineage_dict, rating_dict, tree_keys
    from atelier.settings import home_dir
    from store import open_store, queries

    # 1. The store, when there is one: it also knows paths, runs and timings.
    h, path = home_dir(home), Path(ref)
    has_store = bool(store_url) or (h / "lineage.db").exists()
    data, origin, carrier, where = None, "store", None, store_url or str(h / "lineage.db")
    ratings: dict[str, dict] = {}
    found = metadata.read_embedded(path) if path.is_file() else None
    if has_store:
        st = open_store(h, store_url)
        where = st.url
        with st.sessions() as s:
            asset = queries.find_asset(s, ref)
            if asset is None and found is not None:
                asset = queries.find_asset(s, found.doc["key"])  # the delivered copy of a stored asset
            if asset is not None:
                data = lineage_dict(queries.ancestry(s, asset.key))
                ratings = {k: rating_dict(r) for k, r in queries.latest_ratings(s, tree_keys(data)).items()}
    # 2. Else the lineage the file carries (a copy elsewhere, a JPEG / WebP delivery, no store at all).
    if data is None and found is not None:
        data, origin, carrier = metadata.lineage_tree(found.doc), "embedded metadata", found.carrier
    if data is None:
        if not path.is_file():
            _fail(f"{ref}: no asset with this key or key prefix in {where}" if has_store
                  else f"no lineage store at {where} (run a brief first, or pass --home)")
        none_carried = "the file carries no atelier lineage (PNG chunk, XMP or .json sidecar)"
        _fail(f"{ref}: no asset with this file content in {where}, and {none_carried}" if has_store
              else f"{ref}: {none_carried}, and there is no lineage store at {where}")
    annotate_changes(data)
    annotate_rounds(data, ratings)
    creds = _credentials(path) if path.is_file() else None
    if as_json:
        return _print_json({**data, "from": origin, **({"carrier": carrier} if carrier else {}),
                            **({"credentials": creds} if creds else {})})
    if carrier:
        out.print(f"[dim](from embedded metadata: {escape(carrier)})[/]", highlight=False)
    if creds:
        state = creds["validation_state"] + ("; signer untrusted" if creds["untrusted"] else "")
        out.print(f"C2PA: signed by {escape(str(creds['signer']))} ({state}) · {creds['digital_source_type']} · "
                  f"{len(creds['ingredients'])} ingredients", highlight=False)
    out.print(_lineage_tree(None, data))


def _lineage_tree(parent: Tree | None, node: dict, seen: set[str] | None = None) -> Tree:
    """One line per asset: stage, key, role, size, then what it changed relative to its source.

    An ancestor met before (the style references of both refine and inpaint) is named, not repeated.
    """
    seen = set() if seen is None else seen
    head = f"[bold]{node['stage']}[/] {node['key'][:10]}" + (f" [dim]({node['role']})[/]" if node["role"] else "")
    if node["key"] in seen:
        label = head + " [dim]· as above[/]"
    else:
        seen.add(node["key"])
        changed = []
        shown = {"size", "model"} | ({"round", "strength"} if "variation" in node else set())  # on the line already
        for k, (before, after) in node.get("changed", {}).items():
            if k in shown:
                continue
            changed.append(f"{k} {_short(before)}→{_short(after)}" if before is not None else f"{k}={_short(after)}")
        model = node.get("changed", {}).get("model")
        label = (head + (f" {node['width']}x{node['height']}" if node["width"] else "")
                 + (f" · [magenta]{escape(node['pick']['text'])}[/]" if "pick" in node else "")
                 + (f" · {escape(node['variation']['text'])}" if "variation" in node else "")
                 + (f" · {escape(', '.join(changed))}" if changed else "")
                 + (f" · model {escape(model[1])}" if model else "")
                 + _marks({"rating": node.get("rating")}))
    t = Tree(label, guide_style="dim") if parent is None else parent.add(label)
    if label.endswith("as above[/]"):
        return t
    for p in node["parents"]:
        _lineage_tree(t, p, seen)
    return t


def _short(value: Any, limit: int = 32) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 2] + "…" + text[-1]


def _credentials(path: Path) -> dict | None:
    """The file's C2PA manifest, summarised and validated (None when it carries none or cannot hold one)."""
    from atelier import credentials

    try:
        c = credentials.read_credentials(path)
    except Exception as exc:  # noqa: BLE001 - a damaged manifest is worth a line, not a traceback
        return {"validation_state": "Invalid", "error": str(exc), "signer": None, "untrusted": False,
                "digital_source_type": None, "ingredients": [], "errors": []}
    if c is None:
        return None
    created = next((a for a in c.actions() if a.get("action") == "c2pa.created"), {})
    codes = [e.get("code") for e in c.validation_errors]
    return {"validation_state": c.validation_state, "signer": c.signer,
            "untrusted": "signingCredential.untrusted" in codes,
            "errors": [x for x in codes if x != "signingCredential.untrusted"],
            "digital_source_type": (created.get("digitalSourceType") or "").rsplit("/", 1)[-1] or None,
            "model": (created.get("softwareAgent") or {}).get("name"),
            "ingredients": [{"title": i.get("title"), "relationship": i.get("relationship"),
                             "key": str(i.get("instance_id", "")).removeprefix("atelier:")}
                            for i in c.manifest.get("ingredients", [])]}
