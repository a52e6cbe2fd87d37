"""Rounds and review gates end to end (tiny models, through the CLI): stop at a gate, decide, resume,
re-run with 0 model calls, change one pick and recompute only its chain, survive a kill at the gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Asset, Edge, Gate, Review, Run, RunAsset, StageRun
from tests.conftest import tiny_home, with_refs, write_brief

pytestmark = pytest.mark.slow  # campaigns through Prefect

BRIEF = """\
campaign: rounds
profile: tiny
seed: 11
review: true
rounds:
  - {vary: subtle, drafts: 2, keep: 2, prompt_append: "at dusk"}
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 4
    keep: 2
    size: 128x128
  - name: tile
    prompt: "a cup of coffee"
    drafts: 2
    keep: 1
    size: 96x96
    review: false
    rounds: []
"""


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, res.output
    return res.output


def run_info(home: Path, run_id: str) -> Run:
    with open_store(home).sessions() as s:
        return s.get(Run, run_id)


def members(home: Path, run_id: str) -> Counter:
    """(deliverable, stage, status) of every asset a run used."""
    with open_store(home).sessions() as s:
        rows = s.execute(select(Asset.deliverable, Asset.stage, RunAsset.status).join(
            RunAsset, RunAsset.asset_key == Asset.key).where(RunAsset.run_id == run_id)).all()
    return Counter(tuple(r) for r in rows)


def finals(home: Path, run_id: str, deliverable: str) -> list[str]:
    with open_store(home).sessions() as s:
        return sorted(s.scalars(select(RunAsset.asset_key).join(Asset, Asset.key == RunAsset.asset_key).where(
            RunAsset.run_id == run_id, RunAsset.final.is_(True), Asset.deliverable == deliverable)))


def ancestors(home: Path, key: str) -> dict[str, Asset]:
    from store import queries

    out: dict[str, Asset] = {}
    with open_store(home).sessions() as s:
        def walk(node: dict) -> None:
            out[node["asset"].key] = node["asset"]
            for p in node["parents"]:
                walk(p)
        walk(queries.ancestry(s, key))
    return out


def gates_json(home: Path, run_id: str, *extra: str) -> list[dict]:
    return json.loads(cli("review", run_id, "--home", str(home), "--json", *extra))["awaiting"]


@pytest.fixture(scope="module")
def flow(prefect_server, models_dir, tmp_path_factory) -> dict:
    """A run stopped at round 0's gate, decided, resumed to round 1's gate, decided, resumed to the finals."""
    folder = with_refs(tmp_path_factory.mktemp("brief"))
    brief = write_brief(folder, BRIEF)
    home = tiny_home(tmp_path_factory.mktemp("home"), models_dir)
    h = str(home)
    state: dict = {"home": home, "brief": brief, "outputs": {}}
    state["outputs"]["run"] = cli("run", str(brief), "--home", h, "--no-report")
    with open_store(home).sessions() as s:
        run_id = s.scalars(select(Run.id)).one()
    state["run_id"] = run_id
    state["status"] = [run_info(home, run_id).status]
    state["gates0"] = gates_json(home, run_id)
    state["runs_awaiting"] = json.loads(cli("runs", "--awaiting", "--home", h, "--json"))
    # round 0: keep 3 then 1 (not CLIP's order), reject 2, star 3
    state["outputs"]["review0"] = cli("review", run_id, "--home", h, "--keep", "3,1", "--reject", "2", "--star", "3=5",
                                      "--note", "the brick reads best", "--by", "ana", "--resume")
    state["status"].append(run_info(home, run_id).status)
    state["gates1"] = gates_json(home, run_id)
    state["outputs"]["review1"] = cli("review", run_id, "--home", h, "-d", "hero", "--keep", "2", "--by", "ben",
                                      "--note", "dusk one")
    state["outputs"]["resume"] = cli("resume", run_id, "--home", h, "--no-report")
    state["status"].append(run_info(home, run_id).status)
    return state


def test_a_run_stops_at_the_gate_and_says_how_to_go_on(flow) -> None:
    home, run_id = flow["home"], flow["run_id"]
    assert "awaits review" in flow["outputs"]["run"] and f"atelier review {run_id}" in flow["outputs"]["run"]
    assert flow["status"] == ["awaiting review", "awaiting review", "completed"]
    [waiting] = flow["runs_awaiting"]
    assert waiting["id"] == run_id and waiting["awaiting"] == [{"deliverable": "hero", "round": 0, "candidates": 4}]
    [g0] = flow["gates0"]
    assert (g0["deliverable"], g0["round"], len(g0["candidates"])) == ("hero", 0, 4)
    assert sorted(g0["suggestion"]) == sorted(c["number"] for c in g0["candidates"] if c["clip_kept"])
    assert len(g0["suggestion"]) == 2
    # the deliverable without review went on to its finals while hero waited
    assert len(finals(home, run_id, "tile")) == 1


def test_round_one_varies_the_person_s_picks(flow) -> None:
    home = flow["home"]
    [g1] = flow["gates1"]
    assert (g1["deliverable"], g1["round"], len(g1["candidates"])) == ("hero", 1, 4)  # 2 picks x 2 variations
    g0 = flow["gates0"][0]
    picked = [g0["candidates"][2]["key"], g0["candidates"][0]["key"]]  # candidates 3 and 1
    with open_store(home).sessions() as s:
        for c in g1["candidates"]:
            assert c["stage"] == "vary"
            a = s.get(Asset, c["key"])
            assert a.params["round"] == 1 and a.params["prompt"].endswith("at dusk")
            # a variation's init is a pick of candidate 3 or 1
            init = s.scalars(select(Edge.parent).where(Edge.child == c["key"], Edge.role == "init")).one()
            pick = s.get(Asset, init)
            assert pick.stage == "pick"
            source = s.scalars(select(Edge.parent).where(Edge.child == init, Edge.role == "source")).one()
            assert source in picked
        review0 = s.scalars(select(Review).where(Review.round == 0)).one()
    assert review0.kept == picked and review0.by == "ana" and review0.note == "the brick reads best"
    assert review0.rejected == [g0["candidates"][1]["key"]] and review0.stars == {picked[0]: 5}


def test_the_final_s_lineage_names_the_person_s_pick(flow) -> None:
    home, run_id = flow["home"], flow["run_id"]
    [final] = finals(home, run_id, "hero")  # round 1 kept one
    chain = ancestors(home, final)
    picks = sorted((a for a in chain.values() if a.stage == "pick"), key=lambda a: a.params["round"])
    assert [p.params["kept_by"] for p in picks] == ["ana", "ben"]
    assert picks[1].params["note"] == "dusk one" and picks[1].params["candidates"] == 4
    assert 1 <= picks[1].params["clip_rank"] <= 4
    g1 = flow["gates1"][0]
    assert Edge and any(a.key == g1["candidates"][1]["key"] for a in chain.values())  # candidate 2 of round 1
    # the embedded lineage document of the delivered PNG carries the decision
    from atelier import metadata

    exported = next(Path(p) for p in (home / "outputs" / "rounds").glob("hero-*.png"))
    doc = metadata.read_embedded(exported).doc
    assert "ben" in json.dumps(doc) and "dusk one" in json.dumps(doc)


def test_an_unchanged_rerun_reuses_the_picks_and_calls_no_model(flow) -> None:
    home = flow["home"]
    cli("run", str(flow["brief"]), "--home", str(home), "--no-report")
    with open_store(home).sessions() as s:
        rerun = s.scalars(select(Run).order_by(Run.started_at.desc())).first()
    assert rerun.id != flow["run_id"] and rerun.status == "completed"
    assert rerun.info["model_calls"]["count"] == 0
    assert finals(home, rerun.id, "hero") == finals(home, flow["run_id"], "hero")
    assert not any(status == "computed" for (_, _, status) in members(home, rerun.id))


def test_changing_one_pick_recomputes_only_its_chain(flow, tmp_path) -> None:
    from tests.conftest import copy_home

    home = copy_home(flow["home"], tmp_path / "home")
    run_id, h = flow["run_id"], str(home)
    before = finals(home, run_id, "hero")
    # round 1 again: keep candidate 2 (as before) and 4
    cli("review", run_id, "--home", h, "--round", "1", "--keep", "2,4", "--by", "ben", "--resume")
    with open_store(home).sessions() as s:
        rows = s.scalars(select(StageRun).where(StageRun.run_id == run_id, StageRun.deliverable == "hero")
                         .order_by(StageRun.id.desc())).all()
    last = {}
    for r in rows:  # the latest pass's row of each stage
        last.setdefault(r.stage, r)
    assert (last["pick"].computed, last["pick"].reused) == (1, 1)
    assert (last["refine"].computed, last["refine"].reused) == (1, 1)
    for stage in ("draft", "vary"):
        assert last[stage].computed == 0, stage
    after = finals(home, run_id, "hero")
    assert len(after) == 2 and set(before) < set(after)
    assert run_info(home, run_id).status == "completed"


def test_bad_decisions_are_one_line_and_write_nothing(flow, tmp_path) -> None:
    from tests.conftest import copy_home

    home = copy_home(flow["home"], tmp_path / "home")
    h, run_id = str(home), flow["run_id"]
    with open_store(home).sessions() as s:
        n = len(s.scalars(select(Review)).all())
    for args, words in ((["--round", "1", "--keep", "9"], "candidate 9 does not exist"),
                        (["--round", "1", "--keep", "1", "--reject", "1"], "both name candidate 1"),
                        (["--round", "1", "--keep", "x"], "expected candidate numbers"),
                        (["--round", "1", "--keep", "1", "--star", "1=7"], "stars must be 1-5"),
                        (["--keep", "1"], "nothing awaiting review"),
                        (["--round", "5", "--keep", "1"], "no gate")):
        res = CliRunner().invoke(app, ["review", run_id, "--home", h, *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and "Traceback" not in res.output, (args, res.output)
    res = CliRunner().invoke(app, ["review", "nope", "--home", h, "--keep", "1"])
    assert res.exit_code == 2 and "no run 'nope'" in res.output
    with open_store(home).sessions() as s:
        assert len(s.scalars(select(Review)).all()) == n


def test_a_kill_while_passing_the_gate_resumes_cleanly(flow, models_dir, tmp_path) -> None:
    """kill -9 inside the save of the person's picks (committed, files not moved into place): the run is left
    "running" with a dead process; `atelier resume` takes it over and finishes, and doctor finds nothing."""
    home = tiny_home(tmp_path / "home", models_dir)
    h = str(home)
    cli("run", str(flow["brief"]), "--home", h, "--no-report", "--profile", "tiny")
    # a new home has no decisions: it stops at round 0 again
    with open_store(home).sessions() as s:
        run_id = s.scalars(select(Run.id)).one()
        assert s.get(Run, run_id).status == "awaiting review"
    cli("review", run_id, "--home", h, "--keep", "1,2", "--by", "ana")
    from prefect.settings import PREFECT_API_URL

    # the session's Prefect server (a subprocess of its own would outlive the kill and hold its pipes open)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "ATELIER_FAULT": "after-commit",
           "ATELIER_FAULT_AFTER": "1"}  # the first save() of the resumed run: the person's picks
    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "atelier.cli", "resume", run_id, "--home", h, "--no-report"],
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == -9, log.read_text()
    with open_store(home).sessions() as s:
        assert s.get(Run, run_id).status == "running"
        assert len(s.scalars(select(Asset).where(Asset.stage == "pick")).all()) == 2  # committed before the kill
    out = cli("resume", run_id, "--home", h, "--no-report")
    assert "awaits review" in out  # round 1's gate now
    with open_store(home).sessions() as s:
        assert [g.round for g in s.scalars(select(Gate).where(Gate.run_id == run_id))] == [0, 1]
    doctor = json.loads(cli("doctor", "--home", h, "--json"))
    assert doctor["problems"] == [] and doctor["healthy"]


def test_prefect_shows_the_paused_run_and_its_candidates(flow) -> None:
    """The first pass of the run ended in a Completed state named AwaitingReview, with a Markdown artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
        states = [st for fr in runs for st in client.read_flow_run_states(fr.id)
                  if (fr.parameters or {}).get("run_id") == flow["run_id"]]
        response = client._client.post("/artifacts/filter", json={
            "artifacts": ArtifactFilter(key=ArtifactFilterKey(any_=["rounds-awaiting-review"])).model_dump(mode="json"),
            "sort": "CREATED_DESC", "limit": 50, "offset": 0})
        arts = response.json()
    named = [st for st in states if st.name == "AwaitingReview"]
    assert named and all(st.type.value == "COMPLETED" for st in named)
    assert f"atelier review {flow['run_id']}" in named[0].message
    assert arts and any(flow["run_id"] in (a["data"] or "") and "CLIP rank" in (a["data"] or "") for a in arts)


def test_a_schedule_tick_resumes_reviewed_runs_and_does_not_restart_waiting_ones(prefect_server, models_dir,
                                                                                  tmp_path) -> None:
    from flows.batch import batch_flow

    folder = with_refs(tmp_path / "briefs")
    write_brief(folder, BRIEF.replace("review: true", "review: last").replace("rounds:\n  - {vary: subtle, drafts: 2, "
                                                                               'keep: 2, prompt_append: "at dusk"}',
                                                                               "rounds: []"))
    home = tiny_home(tmp_path / "home", models_dir)
    first = batch_flow(folder=str(folder), home=str(home))
    assert len(first["ran"]) == 1
    with open_store(home).sessions() as s:
        [run] = s.scalars(select(Run)).all()
    assert run.status == "awaiting review"
    # waiting for a person: the next tick neither resumes it nor starts the brief again
    second = batch_flow(folder=str(folder), home=str(home))
    assert second["ran"] == [] and second["resumed"] == [] and second["unchanged"] == [str(folder / "brief.yaml")]
    cli("review", run.id, "--home", str(home), "--accept", "--by", "night-shift")
    third = batch_flow(folder=str(folder), home=str(home))
    assert third["resumed"] == [run.id] and third["ran"] == []
    assert run_info(home, run.id).status == "completed" and len(finals(home, run.id, "hero")) == 2
