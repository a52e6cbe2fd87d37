"""`atelier review` (a person's decision at a run's review gates) and `atelier rate` (stars and rejects)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from atelier.cli.common import AssetsOpt, HomeOpt, JsonOpt, StoreOpt, _fail, _open, _print_json, app, out
from atelier.errors import UsageError


@app.command()
def review(
    run_id: str = typer.Argument(..., help="the run that awaits review"),
    deliverable: Optional[str] = typer.Option(None, "--deliverable", "-d", help="the deliverable decided for "
                                                                               "(needed when several await review)"),
    round_no: Optional[int] = typer.Option(None, "--round", min=0, help="a gate of this round, even one decided "
                                                                       "already: decide again (the latest counts)"),
    keep: Optional[str] = typer.Option(None, "--keep", help="candidates to keep, in order, e.g. 3,5"),
    accept: bool = typer.Option(False, "--accept", help="keep CLIP's suggestion (alone: at every open gate)"),
    reject: Optional[str] = typer.Option(None, "--reject", help="candidates to reject, e.g. 2,7"),
    star: Optional[list[str]] = typer.Option(None, "--star", help="CANDIDATE=STARS (1-5); repeatable"),
    note: str = typer.Option("", "--note", help="why (shown in lineage)"),
    by: Optional[str] = typer.Option(None, "--by", help="who decides; default $ATELIER_REVIEWER, else the user name"),
    resume: bool = typer.Option(False, "--resume", help="continue the run at once after the decision"),
    serve: bool = typer.Option(False, "--serve", help="open a local review page (127.0.0.1, a random port and token)"),
    port: int = typer.Option(0, "--port", help="with --serve: the port (0: a free one)"),
    open_page: bool = typer.Option(False, "--open", help="with --serve: open the page in the default browser"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    assets_url: Optional[str] = AssetsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List what a run awaits review for (candidates, CLIP's scores and suggestion), or record a decision."""
    from atelier import review as rv

    st = _open(home, store_url, assets_url)
    try:
        gates = rv.open_gates(st, run_id, deliverable, round_no)
        if serve:
            from atelier.review_page import serve_review

            decided = serve_review(st, run_id, by=by, port=port, deliverable=deliverable, resumes=resume,
                                   open_browser=open_page,
                                   announce=lambda m: out.print(m, highlight=False, markup=False, soft_wrap=True))
            if decided and resume:
                return _resume(run_id, home, store_url, assets_url)
            return
        if keep is None and not accept and not reject and not star:
            if (deliverable is not None or round_no is not None) and not gates:
                raise UsageError(f"run {run_id}: no gate for deliverable {deliverable or 'any'!r}"
                                 + (f" at round {round_no}" if round_no is not None else ""))
            return _print_gates(run_id, gates, as_json, st.home)
        if accept and keep is None and not reject and not star and len(gates) > 1:
            chosen = gates  # --accept alone, several gates: CLIP's suggestion at each of them
        else:
            chosen = [rv.choose_gate(gates, run_id, deliverable, round_no)]
        stars = rv.parse_stars(star, len(chosen[0].candidates))
        recorded = [(g, rv.decide(st, g, keep, reject, stars, note, by, accept=accept)) for g in chosen]
    except UsageError as exc:
        _fail(str(exc))
    done = {g.decision for g, _ in recorded}
    rest = [g for g in rv.open_gates(st, run_id) if g.decision not in done]
    if as_json:
        _print_json({"reviews": [{"review": rid, "deliverable": g.deliverable, "round": g.round} for g, rid in recorded],
                     "run": run_id, "awaiting": [g.deliverable for g in rest]})
    else:
        for gate, review_id in recorded:
            out.print(f"recorded review {review_id}: {gate.deliverable} round {gate.round}", highlight=False)
        if rest:
            out.print("still awaiting review: " + ", ".join(g.deliverable for g in rest), highlight=False)
        elif not resume:
            out.print(f"continue with: atelier resume {run_id}", highlight=False)
    if resume:
        if rest:
            _fail(f"--resume: run {run_id} still awaits review for {', '.join(g.deliverable for g in rest)}")
        _resume(run_id, home, store_url, assets_url)


def _resume(run_id: str, home: Optional[Path], store_url: Optional[str], assets_url: Optional[str]) -> None:
    from atelier.cli.run import resume_run

    resume_run(run_id, home, store_url, assets_url, report=False)


def _print_gates(run_id: str, gates: list, as_json: bool, home: Path) -> None:
    if as_json:
        return _print_json({"run": run_id, "awaiting": [g.to_dict() for g in gates]})
    if not gates:
        out.print(f"run {run_id}: nothing awaits review")
        return
    for g in gates:
        table = Table("#", "CLIP rank", "total", "prompt fit", "mood-board fit", "CLIP keeps", "stage", "file",
                      title=f"{g.deliverable} · round {g.round}", caption=f"files under {home}")
        for c in g.candidates:
            fmt = (lambda v: "" if v is None else f"{v:.3f}")
            table.add_row(str(c.number), str(c.clip_rank or ""), fmt(c.total), fmt(c.prompt_score),
                          fmt(c.moodboard_score), "✓" if c.clip_kept else "", c.stage,
                          escape(_rel(c.path, home)))
        out.print(table)
        out.print(f"CLIP suggests: {','.join(map(str, g.suggestion))}   decide: atelier review {run_id} "
                  f"--deliverable {g.deliverable} --keep {','.join(map(str, g.suggestion))} [--resume]",
                  highlight=False)


def _rel(path: str, home: Path) -> str:
    try:
        return str(Path(path).relative_to(home))
    except ValueError:
        return path


@app.command()
def rate(
    ref: str = typer.Argument(..., help="asset key (or a unique prefix) or an image file atelier made"),
    stars: Optional[int] = typer.Argument(None, help="1-5"),
    reject: bool = typer.Option(False, "--reject", help="mark it rejected"),
    note: str = typer.Option("", "--note"),
    by: Optional[str] = typer.Option(None, "--by", help="who rates; default $ATELIER_REVIEWER, else the user name"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Rate an asset (stars 1-5) or reject it; `atelier assets --rating '>=4'` / `--rejected` find them."""
    from atelier.cli.assets import resolve_asset
    from atelier.review import default_reviewer
    from store import lineage

    if stars is None and not reject:
        _fail("give STARS (1-5), --reject, or both")
    if stars is not None and not 1 <= stars <= 5:
        _fail(f"STARS: expected 1-5, got {stars}")
    st = _open(home, store_url)
    with st.sessions() as s:
        asset = resolve_asset(s, ref)
        if asset is None:
            _fail(f"no asset {ref!r} in {st.url} (give a key, a unique key prefix, or a file atelier made)")
        key = asset.key
    who = (by or default_reviewer())[:64]
    lineage.rate(st, [key], stars, reject, who, note)
    if as_json:
        return _print_json({"key": key, "stars": stars, "rejected": reject, "by": who})
    out.print(f"rated {key[:12]}: " + (f"{'★' * stars}" if stars else "") + (" rejected" if reject else ""),
              highlight=False)
