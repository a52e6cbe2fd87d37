"""Rounds, picks and ratings where people look: `atelier lineage`, the run report (text and JSON), the HTML
contact sheet and its Markdown twin, and `atelier assets --rating / --rejected`.

One small run for the module (tiny models): deliverable ``sq`` has a variation round and a review gate
before refine, ``plain`` neither. The run stops at the gate (a copy of that home is kept: the "awaiting
review" views), a person decides through ``atelier.review.decide``, and the flow resumes the run.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Asset, Rating, Run, RunAsset, Score
from tests.conftest import copy_home, tiny_home, with_refs, write_brief

BRIEF = """\
campaign: rviews
profile: tiny
seed: 7
review: last
rounds:
  - {vary: subtle, drafts: 2, keep: 2}
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: sq
    prompt: "a lighthouse on a cliff"
    aspect: "1:1"
    drafts: 3
    keep: 2
    size: 96x96
  - name: plain
    prompt: "a cup of coffee"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 64x64
    review: false
    rounds: []
"""
NOTE = "the calm one"


@pytest.fixture(scope="module")
def rr(prefect_server, models_dir, tmp_path_factory) -> dict:
    """The run: stopped at sq's gate (``awaiting_home``: a copy of that moment), decided (keep 3,1, reject 2,
    candidate 3 five stars, by ana), resumed to the end, then a few ratings."""
    from atelier.review import decide, open_gates
    from atelier.settings import prepare_environment
    from flows.campaign import campaign_flow
    from store import lineage

    folder = with_refs(tmp_path_factory.mktemp("rbrief"), ("coffee.jpg", "chelsea.jpg"))
    home = tiny_home(tmp_path_factory.mktemp("rhome"), models_dir)
    brief = write_brief(folder, BRIEF)
    res = CliRunner().invoke(app, ["run", str(brief), "--home", str(home), "--no-report"])
    assert res.exit_code == 0, res.output
    st = open_store(home)
    with st.sessions() as s:
        run_id = s.scalars(select(Run.id)).one()
        assert s.get(Run, run_id).status == "awaiting review"
    awaiting_home = copy_home(home, tmp_path_factory.mktemp("awaiting") / "home")
    [gate] = open_gates(st, run_id)
    assert (gate.deliverable, gate.round, len(gate.candidates)) == ("sq", 1, 4)
    decide(st, gate, keep=[3, 1], reject=[2], stars={3: 5}, note=NOTE, by="ana")
    prepare_environment(home)
    campaign_flow(brief_path=str(brief), home=str(home), run_id=run_id, resume=True)
    with st.sessions() as s:
        assert s.get(Run, run_id).status == "completed"
        drafts = sorted(s.scalars(select(Asset).where(Asset.stage == "draft", Asset.deliverable == "sq")),
                        key=lambda a: a.params["index"])
    # ratings: the latest of an asset counts
    lineage.rate(st, [drafts[0].key], 2, False, "bo")
    lineage.rate(st, [drafts[0].key], 5, False, "bo")  # 2 -> 5
    lineage.rate(st, [drafts[1].key], None, True, "bo")
    lineage.rate(st, [drafts[1].key], 3, False, "bo")  # rejected, then 3 stars: no longer rejected
    lineage.rate(st, [drafts[2].key], 1, True, "bo", note="off brief")
    cands = {c.number: c.key for c in gate.candidates}
    return {"home": home, "awaiting_home": awaiting_home, "run_id": run_id, "gate": gate, "cands": cands,
            "drafts": [a.key for a in drafts], "runner": CliRunner()}


def _cli(home: Path, *args: str, columns: int = 80):
    return CliRunner().invoke(app, [*args, "--home", str(home)], env={"COLUMNS": str(columns)})


def _json(home: Path, *args: str):
    res = _cli(home, *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _find(node: dict, stage: str) -> dict | None:
    if node["stage"] == stage:
        return node
    return next((hit for p in node["parents"] if (hit := _find(p, stage)) is not None), None)


def _latest_ratings(home: Path) -> dict[str, Rating]:
    with open_store(home).sessions() as s:
        out: dict[str, Rating] = {}
        for r in s.scalars(select(Rating).order_by(Rating.id)):
            out[r.asset_key] = r
        return out


def _clip_rank(home: Path, decision: str, key: str) -> int:
    with open_store(home).sessions() as s:
        totals = sorted(s.scalars(select(Score).where(Score.decision == decision)), key=lambda sc: -sc.total)
    return [sc.draft_key for sc in totals].index(key) + 1


def _finals(home: Path, run_id: str, deliverable: str) -> list[str]:
    with open_store(home).sessions() as s:
        rows = s.execute(select(RunAsset, Asset).join(Asset, Asset.key == RunAsset.asset_key)
                         .where(RunAsset.run_id == run_id, RunAsset.final.is_(True), Asset.deliverable == deliverable))
        return sorted(ra.export_path for ra, _ in rows)


# ------------------------------------------------------------------------------------------- lineage
@pytest.mark.slow
def test_lineage_names_who_kept_a_pick_and_the_round_of_a_variation(rr) -> None:
    home, gate = rr["home"], rr["gate"]
    finals = _finals(home, rr["run_id"], "sq")
    assert len(finals) == 2
    rank3 = _clip_rank(home, gate.decision, rr["cands"][3])
    node = _json(home, "lineage", finals[0])  # sq-1: the person's first pick (candidate 3)
    pick, vary = _find(node, "pick"), _find(node, "vary")
    assert pick["pick"]["kept_by"] == "ana" and pick["pick"]["note"] == NOTE and pick["pick"]["order"] == 1
    assert pick["pick"]["clip_rank"] == rank3 and pick["pick"]["candidates"] == 4 and pick["pick"]["stars"] == 5
    assert pick["pick"]["text"] == f"kept by ana (CLIP rank {rank3} of 4) ★5: {NOTE}"
    assert not {"gate", "kept_by", "note", "review"} & set(pick["changed"])  # who / why is not a setting
    assert vary["key"] == rr["cands"][3] and vary["parents"][0]["stage"] == "select"
    assert vary["variation"] == {"round": 1, "strength": 0.5, "variation": vary["params"]["variation"],
                                 "text": "round 1 · strength 0.5 (subtle)"}
    assert vary["rating"]["stars"] == 5  # the review's stars are a rating of the candidate
    text = _cli(home, "lineage", finals[0], columns=200).output
    assert f"pick {pick['key'][:10]} (init)" in text and f"kept by ana (CLIP rank {rank3} of 4) ★5: {NOTE}" in text
    assert "round 1 · strength 0.5 (subtle)" in text and "★★★★★" in text
    narrow = _cli(home, "lineage", finals[0]).output
    assert max(len(line) for line in narrow.splitlines()) <= 80


# -------------------------------------------------------------------------------------------- report
@pytest.mark.slow
def test_report_json_nests_rounds_with_clip_and_person_picks(rr) -> None:
    home, cands = rr["home"], rr["cands"]
    data = _json(home, "report", rr["run_id"])
    assert data["run"]["status"] == "completed" and data["awaiting"] == []
    sq = data["deliverables"]["sq"]
    r0, r1 = sq["rounds"]
    assert (r0["round"], r0["kind"], r1["round"], r1["kind"], r1["strength"]) == (0, "drafts", 1, "variations", 0.5)
    # round 0: the drafts, CLIP decides (no gate); what it kept is what round 1 varies
    assert [x["key"] for x in r0["candidates"]] == rr["drafts"] and r0["gate"] is None and r0["picks"] == []
    assert len(r0["clip_kept"]) == 2 and r0["goes_on"] == r0["clip_kept"]
    assert {x["key"] for x in r0["candidates"] if x.get("kept")} == set(r0["clip_kept"])
    select_from = {x["key"]: x["from"] for x in sq["select"]}
    assert {select_from[x["from"]] for x in r1["candidates"]} == set(r0["clip_kept"])
    # round 1: numbered as the gate numbered them; CLIP suggested, ana decided
    assert [x["key"] for x in r1["candidates"]] == [cands[n] for n in (1, 2, 3, 4)]
    assert [x["number"] for x in r1["candidates"]] == [1, 2, 3, 4]
    assert r1["gate"]["status"] == "passed" and r1["gate"]["candidates"] == 4
    assert r1["gate"]["suggestion"] == [n for n in rr["gate"].suggestion]
    assert r1["review"]["by"] == "ana" and r1["review"]["note"] == NOTE
    assert r1["review"]["kept"] == [cands[3], cands[1]] and r1["review"]["rejected"] == [cands[2]]
    assert [p["from"] for p in r1["picks"]] == [cands[3], cands[1]] == r1["goes_on"]
    assert [(p["order"], p["by"], p["note"]) for p in r1["picks"]] == [(1, "ana", NOTE), (2, "ana", NOTE)]
    picked = {x["key"]: x.get("picked") for x in r1["candidates"]}
    assert picked == {cands[1]: 2, cands[2]: None, cands[3]: 1, cands[4]: None}
    by_key = {x["key"]: x for x in r1["candidates"]}
    assert by_key[cands[3]]["rating"]["stars"] == 5 and by_key[cands[2]]["rating"]["rejected"] is True
    assert {x["key"] for x in r1["candidates"] if x.get("kept")} == set(r1["clip_kept"])  # CLIP's marks stay
    # refine takes the person's picks
    assert sorted(x["from"] for x in sq["refine"]) == sorted(p["key"] for p in r1["picks"])
    # a deliverable without rounds or review: one round, CLIP's
    [p0] = data["deliverables"]["plain"]["rounds"]
    assert p0["gate"] is None and p0["picks"] == [] and len(p0["clip_kept"]) == 1
    assert data["deliverables"]["plain"]["awaiting"] is None and len(data["deliverables"]["plain"]["finals"]) == 1
    # ratings on any item: the latest counts
    draft0 = next(x for x in sq["draft"] if x["key"] == rr["drafts"][0])
    assert draft0["rating"]["stars"] == 5 and draft0["rating"]["rejected"] is False


@pytest.mark.slow
def test_report_text_shows_rounds_and_both_kinds_of_picks(rr) -> None:
    text = _cli(rr["home"], "report", rr["run_id"], columns=200).output
    lines = text.splitlines()
    order = [next(i for i, line in enumerate(lines) if marker in line)
             for marker in ("drafts 3", "selection r0", "variations r1", "selection r1", "refine 2", "finals 2")]
    assert order == sorted(order), text
    assert "CLIP kept 2 of 3" in text and "CLIP suggested 2 of 4" in text
    assert f"◆ ana kept r1.3, r1.1 · rejected r1.2: {NOTE}" in text
    assert "◆ picked #1 by ana" in text and "◆ picked #2 by ana" in text and "✓ kept #1" in text
    assert "★★★★★" in text and "✗ rejected" in text
    assert "awaiting" not in text
    narrow = _cli(rr["home"], "report", rr["run_id"]).output
    assert max(len(line) for line in narrow.splitlines()) <= 80


@pytest.mark.slow
def test_report_of_a_run_awaiting_review_shows_what_awaits(rr) -> None:
    home = rr["awaiting_home"]
    data = _json(home, "report", rr["run_id"])
    assert data["run"]["status"] == "awaiting review"
    assert data["awaiting"] == [{"deliverable": "sq", "round": 1, "status": "awaiting", "candidates": 4,
                                 "decision": rr["gate"].decision, "suggestion": rr["gate"].suggestion}]
    sq = data["deliverables"]["sq"]
    assert sq["awaiting"] == data["awaiting"][0] and sq["finals"] == [] and "refine" not in sq
    assert sq["rounds"][1]["gate"]["status"] == "awaiting" and sq["rounds"][1]["picks"] == []
    assert len(sq["moodboard"]) == 2  # no refine yet: the run's references
    assert len(data["deliverables"]["plain"]["finals"]) == 1  # the other deliverable went on
    text = _cli(home, "report", rr["run_id"], columns=200).output
    assert "awaiting review · round 1 · 4 candidates · CLIP suggests " in text
    assert "awaiting review: sq · round 1 · 4 candidates" in text and "finals 1" in text and "finals 0" not in text


# --------------------------------------------------------------------------------- the contact sheet
class _Node:
    def __init__(self, tag: str, attrs: dict, parent: _Node | None) -> None:
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(t if isinstance(t, str) else t.text() for t in self.texts)

    def all(self, tag: str | None = None, cls: str | None = None) -> list[_Node]:
        out = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.classes):
                out.append(c)
            out += c.all(tag, cls)
        return out

    def by_id(self, ident: str) -> _Node:
        return next(n for n in self.all() if n.attrs.get("id") == ident)


class _Tree(HTMLParser):
    VOID = {"img", "br", "meta", "link", "input", "hr"}

    def __init__(self, page: str) -> None:
        super().__init__()
        self.root = self.cur = _Node("root", {}, None)
        self.feed(page)

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        node = _Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.cur.texts.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):  # noqa: ANN001
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):  # noqa: ANN001
        self.cur.texts.append(data)


def _sheet(home: Path, run_id: str, tmp_path: Path) -> _Node:
    page = tmp_path / "sheet.html"
    res = _cli(home, "report", run_id, "--html", str(page))
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    return _Tree(text).root


@pytest.mark.slow
def test_contact_sheet_shows_rounds_picks_and_ratings(rr, tmp_path) -> None:
    cands = rr["cands"]
    root = _sheet(rr["home"], rr["run_id"], tmp_path)
    sq = root.by_id("d-sq")
    r0, r1 = sq.by_id("d-sq-r0"), sq.by_id("d-sq-r1")
    assert "round" in r0.classes and r1.attrs["data-round"] == "1"
    assert len(r0.all("figure", "draft")) == 3 and len(r1.all("figure", "vary")) == 4
    # CLIP's selection and the person's picks are marked apart
    clip = [f for f in r1.all("figure", "kept")]
    assert len(clip) == 2 and all(f.all("span", "kept-mark") for f in clip)
    picked = {f.attrs["data-key"]: f for f in r1.all("figure", "picked")}
    assert set(picked) == {cands[3], cands[1]}
    assert picked[cands[3]].all("span", "pick-mark")[0].text() == "◆ picked #1 by ana"
    assert not any(f.all("span", "pick-mark") for f in r1.all("figure") if f.attrs["data-key"] not in picked)
    review = r1.all("span", "review")[0]
    assert review.attrs["data-by"] == "ana" and NOTE in review.text() and "r1.3, r1.1" in review.text()
    # ratings: stars and rejects on any image that has them (the latest rating)
    fig = {f.attrs["data-key"]: f for f in sq.all("figure") if "data-key" in f.attrs}
    assert fig[cands[3]].all("span", "rating")[0].attrs["data-stars"] == "5"
    assert "rejected" in fig[cands[2]].classes and fig[cands[2]].all("span", "rejected-mark")
    assert fig[rr["drafts"][0]].all("span", "rating")[0].attrs["data-stars"] == "5"  # 2, then 5
    assert fig[rr["drafts"][1]].all("span", "rating")[0].attrs["data-stars"] == "3"
    assert "rejected" not in fig[rr["drafts"][1]].classes  # rejected, then rated 3: no longer
    assert "rejected" in fig[rr["drafts"][2]].classes and "off brief" in fig[rr["drafts"][2]].text()
    # finals: each one's lineage names who kept it
    finals = sq.all("details", "final")
    assert len(finals) == 2
    assert all("kept by ana" in f.all("div", "lineage")[0].text() for f in finals)
    assert "round 1 · strength 0.5 (subtle)" in finals[0].text()
    # a deliverable without rounds: as before (one drafts grid, CLIP's marks)
    plain = root.by_id("d-plain")
    assert len(plain.all("figure", "draft")) == 2 and len(plain.all("span", "kept-mark")) == 1
    assert "Drafts (2, 1 kept)" in plain.text() and not plain.all("figure", "vary")


@pytest.mark.slow
def test_contact_sheet_of_a_run_awaiting_review(rr, tmp_path) -> None:
    root = _sheet(rr["awaiting_home"], rr["run_id"], tmp_path)
    sq = root.by_id("d-sq")
    [waiting] = sq.all("p", "awaiting")
    assert waiting.attrs["data-round"] == "1" and "4 candidates" in waiting.text()
    assert f"atelier review {rr['run_id']}" in waiting.text()
    assert not sq.all("details", "final") and not sq.all("figure", "picked")
    assert len(sq.all("figure", "vary")) == 4 and len(sq.by_id("d-sq-r1").all("figure", "kept")) == 2
    assert len(root.by_id("d-plain").all("details", "final")) == 1
    assert "awaiting review" in root.all("span", "status")[0].text()


@pytest.mark.slow
def test_markdown_sheet_has_the_rounds_and_picks(rr) -> None:
    from atelier.contact_sheet import markdown_sheet, sheet_data

    st = open_store(rr["home"])
    with st.sessions() as s:
        data = sheet_data(s, s.get(Run, rr["run_id"]), only="sq")
    text = markdown_sheet(data, st.files.path, "sq")
    assert "## Drafts" in text and "## Round 1 · variations, strength 0.5" in text
    assert text.count("![variation](data:image/jpeg;base64,") == 4 and text.count("◆ #") == 2
    assert f"◆ **ana** kept r1.3, r1.1: _{NOTE}_" in text and "kept by ana (CLIP rank" in text


# -------------------------------------------------------------------------------------------- assets
@pytest.mark.slow
def test_assets_filter_on_the_latest_rating(rr) -> None:
    home = rr["home"]
    latest = _latest_ratings(home)

    def expect(pred) -> set[str]:  # noqa: ANN001
        return {k for k, r in latest.items() if pred(r)}

    def got(*args: str) -> set[str]:
        return {a["key"] for a in _json(home, "assets", *args, "--limit", "500")}

    assert got("--rating", ">=4") == expect(lambda r: r.stars is not None and r.stars >= 4)
    assert rr["drafts"][0] in got("--rating", ">=4") and rr["drafts"][0] not in got("--rating", "<3")  # 2, then 5
    assert got("--rating", "<=3") == expect(lambda r: r.stars is not None and r.stars <= 3)
    assert got("--rating", ">3") == got("--rating", ">=4") and got("--rating", "<2") == got("--rating", "=1")
    assert got("--rating", "5") == got("--rating", "=5") == expect(lambda r: r.stars == 5)
    rejected = expect(lambda r: r.rejected)
    assert got("--rejected") == rejected == {rr["cands"][2], rr["drafts"][2]}  # drafts[1]: rejected, then 3 stars
    assert not got("--not-rejected") & rejected and rr["drafts"][1] in got("--not-rejected")
    assert got("--rejected", "--rating", "<=1") == {rr["drafts"][2]}
    assert got("--rating", ">=4", "--stage", "vary") == {rr["cands"][3]}
    rows = _json(home, "assets", "--rejected")
    assert all(a["rating"]["rejected"] for a in rows)
    assert {a["stage"] for a in _json(home, "assets", "--stage", "pick")} == {"pick"}
    text = _cli(home, "assets", "--rating", ">=1").output
    assert "★5" in text and max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.slow
@pytest.mark.parametrize("expr", ["x", ">=6", "=>4", "0", ">= four", "4.5", "!=3", ""])
def test_assets_bad_rating_is_one_line_and_exit_2(rr, expr) -> None:
    res = _cli(rr["home"], "assets", "--rating", expr, columns=200)
    assert res.exit_code == 2 and "--rating: expected" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("expr, parsed", [(">=4", (">=", 4)), ("<=2", ("<=", 2)), (">3", (">", 3)), ("<3", ("<", 3)),
                                          ("=5", ("=", 5)), ("5", ("=", 5)), ("==1", ("=", 1)), (" >= 4 ", (">=", 4))])
def test_parse_rating(expr, parsed) -> None:
    from atelier.cli.assets import parse_rating

    assert parse_rating(expr) == parsed


@pytest.mark.parametrize("expr", ["x", ">=6", "=>4", "0", "4.5", "!=3", "", "<>2"])
def test_parse_rating_refuses(expr) -> None:
    from atelier.cli.assets import parse_rating

    with pytest.raises(ValueError):
        parse_rating(expr)
