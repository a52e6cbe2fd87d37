"""End to end: the Prefect campaign flow on tiny models, then the CLI reading its lineage."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Asset, Edge, RunAsset
from tests.conftest import write_brief

pytestmark = pytest.mark.slow  # whole campaigns through Prefect (make test-fast skips them)

BRIEF = """\
campaign: e2e
profile: tiny
seed: 7
brand:
  style_refs: [refs/*.jpg]
  negative: "watermark"
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "16:9"
    drafts: 4
    keep: 2
    size: 320x180
    post:
      inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}
      face_restore: true
      upscale: true
  - name: square
    prompt: "a cup of coffee"
    aspect: "1:1"
    drafts: 3
    keep: 1
    size: 256x256
    post:
      inpaint: {faces: true, prompt: "a smiling face"}
      upscale: true
"""


def _model_calls(home: Path) -> dict:
    """The latest run's model calls (stage entry functions), as the run recorded them in its ``info``."""
    from store import queries

    with open_store(home).sessions() as s:
        return queries.runs(s)[0].info["model_calls"]


def _run(runner, *args: str) -> int:
    """``atelier run ...`` in this process; returns the model calls it made (stage entry functions)."""
    res = runner.invoke(app, ["run", *args, "--no-report"])
    assert res.exit_code == 0, res.output
    return _model_calls(Path(args[list(args).index("--home") + 1]))["count"]


def _latest_report(e2e) -> dict:
    return json.loads(e2e["runner"].invoke(app, ["report", "--home", str(e2e["home"]), "--json"]).output)


def _run_wall(home: Path, run_id: str) -> float:
    """The flow's own start -> finish, from the store (Prefect's server start is not in it)."""
    from store.schema import Run

    with open_store(home).sessions() as s:
        run = s.get(Run, run_id)
        return (run.finished_at - run.started_at).total_seconds()


@pytest.fixture(scope="module")
def e2e(prefect_server, tmp_path_factory):
    """Run the brief twice through the CLI (cold, then unchanged) on one home."""
    from tests.conftest import with_refs

    folder = with_refs(tmp_path_factory.mktemp("brief"), ("coffee.jpg", "chelsea.jpg", "astronaut.jpg"))
    brief = write_brief(folder, BRIEF)
    home = tmp_path_factory.mktemp("home")
    runner = CliRunner()
    calls = [_run(runner, str(brief), "--home", str(home))]
    by_stage = [_model_calls(home)["by_stage"]]
    calls.append(_run(runner, str(brief), "--home", str(home)))
    by_stage.append(_model_calls(home)["by_stage"])
    runs = json.loads(runner.invoke(app, ["runs", "--home", str(home), "--json"]).output)
    return {"home": home, "brief": brief, "runs": [r["id"] for r in reversed(runs)], "runner": runner,
            "model_calls": calls, "by_stage": by_stage}


def test_lineage_is_complete(e2e) -> None:
    st = open_store(e2e["home"])
    cold = e2e["runs"][0]
    with st.sessions() as s:
        members = s.execute(select(RunAsset, Asset).join(Asset, Asset.key == RunAsset.asset_key)
                            .where(RunAsset.run_id == cold)).all()
        counts = Counter((a.deliverable, a.stage) for _, a in members)
        # counts per stage match the brief
        assert counts[(None, "reference")] == 3 and counts[(None, "moodboard")] == 1
        assert counts[("hero", "draft")] == 4 and counts[("square", "draft")] == 3
        for stage in ("select", "refine", "inpaint", "face_restore", "upscale"):
            assert counts[("hero", stage)] == 2, stage
        assert counts[("hero", "mask")] == 1
        for stage in ("select", "refine", "mask", "inpaint", "upscale"):
            assert counts[("square", stage)] == 1, stage
        assert counts[("square", "face_restore")] == 0
        # every non-root asset has parents, and every file is in place with the recorded hash
        import hashlib

        for _, a in members:
            parents = s.scalars(select(Edge).where(Edge.child == a.key)).all()
            if a.stage in ("reference", "draft") or (a.stage == "mask" and "region" in a.params):
                assert parents == [], a.stage
            else:
                assert parents, f"{a.stage} {a.key} has no parents"
            assert hashlib.sha256((st.home / a.path).read_bytes()).hexdigest() == a.sha256
        finals = [(ra, a) for ra, a in members if ra.final]
        assert sorted((a.deliverable, a.width, a.height) for _, a in finals) == [
            ("hero", 320, 180), ("hero", 320, 180), ("square", 256, 256)]
        assert all(Path(ra.export_path).exists() for ra, _ in finals)


def test_rerun_of_unchanged_brief_reuses_everything(e2e) -> None:
    out = e2e["runner"].invoke(app, ["report", e2e["runs"][1], "--home", str(e2e["home"]), "--json"])
    data = json.loads(out.output)
    assert data["run"]["status"] == "completed"
    draft = data["stages"]["draft"]
    assert set(draft) == {"assets", "computed", "reused", "seconds"} and draft["seconds"] >= 0
    assert (draft["assets"], draft["computed"], draft["reused"]) == (7, 0, 7)
    assert all(v["computed"] == 0 for v in data["stages"].values()), data["stages"]
    cold = json.loads(e2e["runner"].invoke(app, ["report", e2e["runs"][0], "--home", str(e2e["home"]), "--json"]).output)
    assert cold["stages"]["draft"]["computed"] == 7


def test_report_json_lists_stages_and_deliverables(e2e) -> None:
    out = e2e["runner"].invoke(app, ["report", "--home", str(e2e["home"]), "--json"])  # latest run
    data = json.loads(out.output)
    assert data["run"]["id"] == e2e["runs"][-1] and data["run"]["random_weights"] is True
    for stage in ("reference", "moodboard", "draft", "select", "refine", "mask", "inpaint", "face_restore", "upscale"):
        assert data["stages"][stage]["assets"] > 0 and "seconds" in data["stages"][stage]
    hero = data["deliverables"]["hero"]
    assert len(hero["draft"]) == 4
    assert sum(1 for d in hero["draft"] if d["kept"]) == 2
    assert {d["rank"] for d in hero["draft"] if d["kept"]} == {1, 2}
    assert set(hero["stages"]) == {"draft", "select", "refine", "mask", "inpaint", "face_restore", "upscale",
                                   "safety"}  # the safety gate scores drafts and finals
    text = e2e["runner"].invoke(app, ["report", "--home", str(e2e["home"])], env={"COLUMNS": "200"}).output
    assert "random-weight test models" in text and "kept #1" in text and "kept #2" in text


def test_lineage_of_a_final_file_walks_back_to_draft_and_references(e2e) -> None:
    final = Path(sorted((e2e["home"] / "outputs" / "e2e").glob("hero-*.png"))[0])
    out = e2e["runner"].invoke(app, ["lineage", str(final), "--home", str(e2e["home"]), "--json"])
    assert out.exit_code == 0, out.output
    node = json.loads(out.output)
    assert node["stage"] == "upscale"
    chain, refs = [], set()

    def walk(n):
        chain.append(n["stage"])
        for p in n["parents"]:
            if p["stage"] == "reference":
                refs.add(p["params"]["source"])
            walk(p)

    walk(node)
    assert {"upscale", "face_restore", "inpaint", "mask", "refine", "select", "draft"} <= set(chain)
    assert refs and all(r.startswith("refs/") for r in refs)

    def find(n, stage):
        if n["stage"] == stage:
            return n
        for p in n["parents"]:
            if (hit := find(p, stage)) is not None:
                return hit

    d = find(node, "draft")
    assert d["params"]["prompt"] == "a red bicycle against a brick wall" and isinstance(d["params"]["seed"], int)
    assert d["model"]["weights_sha256"] and len(d["model"]["weights_sha256"]) == 64
    text = e2e["runner"].invoke(app, ["lineage", str(final), "--home", str(e2e["home"])]).output
    assert "draft" in text and "seed=" in text


def test_unknown_lineage_ref_is_a_clean_error(e2e) -> None:
    res = e2e["runner"].invoke(app, ["lineage", "doesnotexist", "--home", str(e2e["home"])])
    assert res.exit_code == 2 and "no asset" in res.output


def test_editing_one_prompt_recomputes_only_that_chain(e2e, tmp_path) -> None:
    brief = e2e["brief"]
    edited = brief.parent / "edited.yaml"
    edited.write_text(brief.read_text().replace("a cup of coffee", "a cup of tea"))
    res = e2e["runner"].invoke(app, ["run", str(edited), "--home", str(e2e["home"]), "--no-report"])
    assert res.exit_code == 0, res.output
    data = json.loads(e2e["runner"].invoke(app, ["report", "--home", str(e2e["home"]), "--json"]).output)
    hero, square = data["deliverables"]["hero"]["stages"], data["deliverables"]["square"]["stages"]
    assert all(v["computed"] == 0 for v in hero.values()), hero
    assert square["draft"]["computed"] == 3 and square["refine"]["computed"] == 1 and square["inpaint"]["computed"] == 1


def test_changing_refine_settings_reuses_drafts_and_selection(e2e) -> None:
    brief = e2e["brief"]
    edited = brief.parent / "refine-steps.yaml"
    edited.write_text(brief.read_text() + "stages:\n  refine: {steps: 3}\n")
    res = e2e["runner"].invoke(app, ["run", str(edited), "--home", str(e2e["home"]), "--no-report"])
    assert res.exit_code == 0, res.output
    data = json.loads(e2e["runner"].invoke(app, ["report", "--home", str(e2e["home"]), "--json"]).output)
    hero = data["deliverables"]["hero"]["stages"]
    assert hero["draft"]["computed"] == 0 and hero["select"]["computed"] == 0
    assert hero["refine"]["computed"] == 2 and hero["upscale"]["computed"] == 2  # and everything after refine


# ------------------------------------------------------------------------------------ exact reuse
def test_unchanged_rerun_makes_no_model_calls(e2e) -> None:
    cold, rerun = e2e["model_calls"]
    # cold: mood board, then per deliverable draft, select, refine, inpaint, upscale (+ face restore for hero)
    # mood board; hero: draft, select, refine, mask, inpaint, face, upscale; square: the same without face restore
    assert cold == 1 + 7 + 6 and e2e["by_stage"][0]["draft"] == 2
    assert rerun == 0, e2e["by_stage"][1]


def test_unchanged_rerun_wall_is_a_small_fraction_of_the_cold_run(e2e) -> None:
    cold, rerun = (_run_wall(e2e["home"], r) for r in e2e["runs"][:2])
    # Issue 4: <= 5 %. Measured on this brief: ~1.3 % (small finals); the margin absorbs a loaded CI machine,
    # where one slow store or Prefect round trip must not fail the test.
    assert rerun <= 0.05 * cold + 1.0, (rerun, cold)


def test_changing_only_keep_reruns_selection_and_after_not_drafts(e2e) -> None:
    edited = e2e["brief"].parent / "keep.yaml"
    edited.write_text(e2e["brief"].read_text().replace("drafts: 4\n    keep: 2", "drafts: 4\n    keep: 1"))
    calls = _run(e2e["runner"], str(edited), "--home", str(e2e["home"]))
    by_stage = _model_calls(e2e["home"])["by_stage"]
    assert "draft" not in by_stage and "moodboard" not in by_stage
    assert by_stage["select-decision"] == 1 and calls == 1 + 4  # hero: select, refine, inpaint, face, upscale
    data = _latest_report(e2e)
    hero, square = data["deliverables"]["hero"]["stages"], data["deliverables"]["square"]["stages"]
    assert set(hero["draft"]) == {"computed", "reused", "seconds"} and hero["draft"]["seconds"] >= 0
    assert (hero["draft"]["computed"], hero["draft"]["reused"]) == (0, 4)
    assert hero["select"]["computed"] == 1 and hero["refine"]["computed"] == 1 and hero["upscale"]["computed"] == 1
    assert all(v["computed"] == 0 for v in square.values()), square
    assert sum(1 for d in data["deliverables"]["hero"]["draft"] if d["kept"]) == 1


def test_force_recomputes_from_a_stage_on(e2e) -> None:
    calls = _run(e2e["runner"], str(e2e["brief"]), "--home", str(e2e["home"]), "--force", "upscale")
    assert _model_calls(e2e["home"])["by_stage"] == {"upscale": 2} and calls == 2
    stages = {name: d["stages"] for name, d in _latest_report(e2e)["deliverables"].items()}
    for name, n in (("hero", 2), ("square", 1)):
        assert stages[name]["upscale"]["computed"] == n, stages[name]
        assert all(v["computed"] == 0 for k, v in stages[name].items() if k != "upscale"), stages[name]


def test_force_with_an_unknown_stage_is_a_usage_error(e2e) -> None:
    res = e2e["runner"].invoke(app, ["run", str(e2e["brief"]), "--home", str(e2e["home"]), "--force", "polish"])
    assert res.exit_code == 2 and "--force: unknown stage 'polish'" in res.output


# -------------------------------------------------------------------------------------------- retries
@pytest.fixture
def draft_in_flow(e2e, monkeypatch):
    """Run the e2e brief's ``square`` draft task (forced, so it calls the stage) in a flow, with
    ``generate_drafts`` replaced by ``fake``; returns (result or exception, the requests it saw)."""
    from dataclasses import replace

    from prefect import flow

    from atelier.brief import load_brief
    from flows import tasks
    from flows.context import RunContext, RunSpec
    from store import lineage

    campaign = load_brief(e2e["brief"])
    seen = []
    stage = tasks.draft_stage.STAGE

    def run(fake):
        def spy(req, models, on_progress=None):
            seen.append(req)
            return fake(len(seen), req) or stage.run(req, models, on_progress=on_progress)

        monkeypatch.setattr(tasks.draft_stage, "STAGE", replace(stage, run=spy))
        run_id = f"retry-{uuid.uuid4().hex[:12]}"  # not id(fake): a collected function's id comes back
        lineage.start_run(open_store(e2e["home"]), run_id, "e2e", str(e2e["brief"]), campaign.sha256, "tiny", {})
        ctx = RunContext(RunSpec(run_id=run_id, home=str(e2e["home"]), profile="tiny", stages=campaign.brief.stages,
                                 brief_root=str(campaign.root), force="draft"))

        @flow(name="retry-probe")
        def probe():
            return tasks.draft_task.with_options(retry_delay_seconds=0)(ctx, campaign, "square")

        try:
            return probe(), seen
        except Exception as exc:  # noqa: BLE001
            return exc, seen

    return run


def test_transient_io_error_is_retried(draft_in_flow) -> None:
    def flaky(n, req):
        if n == 1:
            raise OSError(5, "Input/output error")

    result, seen = draft_in_flow(flaky)
    assert len(seen) == 2 and isinstance(result, list) and len(result) == 3


def test_cuda_out_of_memory_is_retried_with_half_the_batch(draft_in_flow) -> None:
    class OutOfMemoryError(RuntimeError):  # what torch.OutOfMemoryError looks like to the retry policy
        pass

    def oom(n, req):
        if n == 1:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result, seen = draft_in_flow(oom)
    assert isinstance(result, list) and [r.batch_size for r in seen] == [4, 2]


def test_bad_input_is_not_retried(draft_in_flow) -> None:
    def bad(n, req):
        raise ValueError("scheduler 'lcm' cannot run guidance 0.5")

    result, seen = draft_in_flow(bad)
    assert isinstance(result, ValueError) and len(seen) == 1


def test_model_tasks_are_tagged_gpu_only_when_a_limit_exists(prefect_server) -> None:
    """`prefect concurrency-limit create gpu 1` (the client call below) makes runs tag their model tasks."""
    from prefect import get_client

    from flows.campaign import gpu_limit_exists

    assert not gpu_limit_exists()
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
        try:
            assert gpu_limit_exists()
        finally:
            client.delete_concurrency_limit_by_tag("gpu")
    assert not gpu_limit_exists()
