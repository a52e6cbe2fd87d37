"""A campaign on the ``hosted`` profile through the Prefect flow: drafts from the Replicate stand-in, refine from
the OpenAI stand-in; lineage records each request; a re-run sends no request; the fake keys are nowhere on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Asset, Edge
from tests.conftest import with_refs, write_brief
from tests.standins import OpenAIStandIn, ReplicateStandIn

pytestmark = pytest.mark.slow  # a whole campaign through Prefect

OPENAI_KEY = "sk-atelier-FAKE-campaign-5d1f3e7a9b2c"
REPLICATE_KEY = "r8_atelierFAKEcampaign3c5e7a9b1d"

BRIEF = """\
campaign: hosted-e2e
profile: hosted
seed: 3
brand:
  style_refs: [refs/*.jpg]
  negative: "watermark"
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "16:9"
    drafts: 3
    keep: 2
    size: 320x180
  - name: square
    prompt: "a cup of coffee"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 256x256
"""


@pytest.fixture(scope="module")
def hosted_run(prefect_server, tmp_path_factory):
    """The brief run twice on one home against the stand-ins, with fake keys in the environment."""
    import prefect.settings

    mp = pytest.MonkeyPatch()
    with OpenAIStandIn(OPENAI_KEY) as o, ReplicateStandIn(REPLICATE_KEY) as r:
        mp.setenv("OPENAI_API_KEY", OPENAI_KEY)
        mp.setenv("REPLICATE_API_TOKEN", REPLICATE_KEY)
        mp.setenv("OPENAI_BASE_URL", o.url + "/v1")
        mp.setenv("REPLICATE_BASE_URL", r.url)
        folder = with_refs(tmp_path_factory.mktemp("brief"), ("coffee.jpg", "chelsea.jpg"))
        brief = write_brief(folder, BRIEF)
        home = tmp_path_factory.mktemp("home")
        runner = CliRunner()
        outputs, requests = [], []
        logs = _Capture()
        loggers = [logging.getLogger(name) for name in ("", "prefect", "httpx", "openai", "replicate")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(logs)
            lg.setLevel(logging.DEBUG)
        try:
            for _ in range(2):
                res = runner.invoke(app, ["run", str(brief), "--home", str(home)])
                assert res.exit_code == 0, res.output
                outputs.append(res.output)
                requests.append((len(r.api_requests()), len(o.api_requests())))
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(logs)
                lg.setLevel(level)
        db = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[-1]
        yield {"home": home, "outputs": outputs, "requests": requests, "prefect_db": Path(db), "logs": logs.lines}
    mp.undo()


class _Capture(logging.Handler):
    """Every log record of the runs, formatted with its arguments (where a leaked key would show)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot format is still checked raw
            self.lines.append(f"{record.msg!r} {record.args!r}")


def test_drafts_and_refines_come_from_two_backends_with_lineage(hosted_run):
    assert hosted_run["requests"][0] == (5, 3)  # 3 + 2 drafts on Replicate, 2 + 1 refines on OpenAI
    with open_store(hosted_run["home"]).sessions() as s:
        assets = s.scalars(select(Asset).where(Asset.campaign == "hosted-e2e")).all()
        drafts = [a for a in assets if a.stage == "draft"]
        refines = [a for a in assets if a.stage == "refine"]
        assert len(drafts) == 5 and len(refines) == 3
        for a in drafts:
            facts = a.params["remote"]
            assert facts["backend"] == "replicate" and facts["request_id"] and facts["usd"] == 0.003
            assert facts["params_sent"]["input"]["seed"] == a.params["seed"]
            assert a.model["kind"] == "remote" and a.model["source"] == "replicate:black-forest-labs/flux-schnell"
        for a in refines:
            facts = a.params["remote"]
            assert facts["backend"] == "openai" and facts["request_id"].startswith("req_")
            assert facts["params_sent"]["endpoint"] == "images.edit" and facts["params_sent"]["style_references_sent"] == 2
            assert a.model["pipeline"]["source"] == "openai:gpt-image-1"
            assert (a.width, a.height) in ((1536, 1024), (1024, 1024))


def test_a_rerun_sends_no_request(hosted_run):
    assert hosted_run["requests"][1] == hosted_run["requests"][0]  # everything reused: $0


def test_the_keys_are_nowhere_on_disk_or_in_the_logs(hosted_run):
    assert len(hosted_run["logs"]) > 10  # the runs' logs were captured
    files = [p for p in Path(hosted_run["home"]).rglob("*") if p.is_file() and not p.is_symlink()]
    db = hosted_run["prefect_db"]
    files += [p for p in db.parent.glob(db.name + "*") if p.is_file()]  # the Prefect database (and its WAL)
    assert len(files) > 10 and any(p.suffix == ".png" for p in files)
    for key in (OPENAI_KEY, REPLICATE_KEY):
        needle = key.encode()
        leaks = [str(p) for p in files if needle in p.read_bytes()]
        assert not leaks, f"{key[:6]}... found in {leaks}"
        assert all(key not in out for out in hosted_run["outputs"])
        assert not [line for line in hosted_run["logs"] if key in line]


def test_local_drafts_with_hosted_refine(prefect_server, tmp_path, monkeypatch):
    """The mixed profile: trained micro drafts on this CPU, refine by the OpenAI stand-in."""
    with OpenAIStandIn(OPENAI_KEY) as o:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", o.url + "/v1")
        folder = with_refs(tmp_path / "brief", ("coffee.jpg",))
        brief = write_brief(folder, BRIEF.replace("profile: hosted", "profile: micro-hosted-refine"))
        home = tmp_path / "home"
        res = CliRunner().invoke(app, ["run", str(brief), "--home", str(home), "--no-report"])
        assert res.exit_code == 0, res.output
        assert len(o.api_requests()) == 3 and OPENAI_KEY not in res.output
    with open_store(home).sessions() as s:
        assets = s.scalars(select(Asset)).all()
        drafts = [a for a in assets if a.stage == "draft"]
        refines = [a for a in assets if a.stage == "refine"]
        assert len(drafts) == 5 and all("remote" not in a.params and a.model["kind"] == "diffusers" for a in drafts)
        assert len(refines) == 3 and all(a.params["remote"]["backend"] == "openai" for a in refines)


def _report(home: Path, run_id: str | None = None) -> dict:
    import json

    res = CliRunner().invoke(app, ["report", *([run_id] if run_id else []), "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_the_report_shows_dollars_and_a_rerun_costs_nothing(hosted_run):
    with open_store(hosted_run["home"]).sessions() as s:
        assets = s.scalars(select(Asset).where(Asset.campaign == "hosted-e2e")).all()
    usd = {a.key: a.params["remote"]["usd"] for a in assets if "remote" in (a.params or {})}
    by_stage = {st: sum(a.params["remote"]["usd"] for a in assets if a.stage == st) for st in ("draft", "refine")}
    from store import queries

    with open_store(hosted_run["home"]).sessions() as s:
        first, second = sorted(queries.runs(s), key=lambda r: r.started_at)[-2:]
    cold, warm = _report(hosted_run["home"], first.id), _report(hosted_run["home"], second.id)
    dol = cold["dollars"]
    assert dol["usd"] == pytest.approx(sum(usd.values())) and dol["saved_by_reuse"] == 0
    assert dol["by_stage"] == {k: pytest.approx(v) for k, v in by_stage.items()}
    assert dol["by_deliverable"]["hero"] == pytest.approx(3 * 0.003 + 2 * 0.063)  # 1536x1024 medium refines
    assert dol["by_deliverable_stage"]["square"] == {"draft": pytest.approx(0.006), "refine": 0.042}
    hero = dol["drafting_saving"]["hero"]
    assert hero["all_at_refine_price"] == pytest.approx(3 * 0.063) and hero["saving"] == pytest.approx(0.054)
    assert dol["price_tables"] == {"openai:gpt-image-1": "2025-06", "replicate:black-forest-labs/flux-schnell": "2025-06"}
    assert all(x["usd"] == usd[x["key"]] for x in cold["deliverables"]["hero"]["draft"] + cold["deliverables"]["hero"]["refine"])
    assert warm["dollars"]["usd"] == 0 and warm["dollars"]["saved_by_reuse"] == pytest.approx(dol["usd"])
    assert all(x["usd_this_run"] == 0 for x in warm["deliverables"]["hero"]["draft"])
    text = hosted_run["outputs"][0]  # `atelier run` prints the report
    assert "dollars" in text and "$0.003" in text and "2025-06" in text and "list prices" in text
    assert "$0.003, reused: $0" in hosted_run["outputs"][1]


BUDGET_BRIEF = BRIEF.replace("seed: 3\n", "seed: 3\nbudget: {usd: %s}\n")


def test_a_budget_stops_cleanly_and_a_rerun_with_more_pays_only_for_the_rest(prefect_server, tmp_path, monkeypatch):
    """Below the first stage's estimate: no request at all. Enough for hero's drafts ($0.009), not its refines
    ($0.126): the drafts are made and recorded, nothing of the refines. Raised: the rest, with the drafts reused."""
    from store import queries

    with OpenAIStandIn(OPENAI_KEY) as o, ReplicateStandIn(REPLICATE_KEY) as r:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", o.url + "/v1")
        monkeypatch.setenv("REPLICATE_BASE_URL", r.url)
        folder = with_refs(tmp_path / "brief", ("coffee.jpg",))
        home = tmp_path / "home"
        runner = CliRunner()

        def run(usd: str):  # noqa: ANN202
            brief = write_brief(folder, BUDGET_BRIEF % usd)
            return runner.invoke(app, ["run", str(brief), "--home", str(home)], env={"COLUMNS": "200"})

        res = run("0.005")
        assert res.exit_code == 1
        assert "budget $0.005: $0 spent, the next 3 requests (~$0.009) would exceed it" in " ".join(res.output.split())
        assert (len(r.api_requests()), len(o.api_requests())) == (0, 0)
        res = run("0.05")
        assert res.exit_code == 1 and (len(r.api_requests()), len(o.api_requests())) == (3, 0)
        with open_store(home).sessions() as s:
            failed = sorted(queries.runs(s), key=lambda x: x.started_at)[-1]
            assert failed.status == "failed" and "\n" not in failed.error
            assert "deliverable hero" in failed.error and "budget $0.05: $0.009 spent, the next 2 requests" in failed.error
            stages = [a.stage for _, a in queries.run_assets(s, failed.id)]
            assert stages.count("draft") == 3 and "refine" not in stages
        res = runner.invoke(app, ["resume", failed.id, "--home", str(home)])  # the same brief: stops again
        assert res.exit_code == 1 and (len(r.api_requests()), len(o.api_requests())) == (3, 0)
        write_brief(folder, BUDGET_BRIEF % "1")
        res = runner.invoke(app, ["resume", failed.id, "--home", str(home)])
        assert res.exit_code == 2 and "changed since run" in res.output  # a raised budget: run it anew
        res = run("1")
        assert res.exit_code == 0, res.output
        assert (len(r.api_requests()), len(o.api_requests())) == (5, 3)  # hero's drafts were not asked for again
    dol = _report(home)["dollars"]
    assert dol["saved_by_reuse"] == pytest.approx(0.009)
    assert dol["usd"] == pytest.approx(2 * 0.003 + 2 * 0.063 + 0.042)
    assert dol["by_stage"] == {"draft": pytest.approx(0.006), "refine": pytest.approx(0.168)}


TOGETHER_KEY = "tgp_v1_atelierFAKEcampaign8e6c4a2f"
INPAINT_BRIEF = BRIEF.replace("profile: hosted", "profile: hosted-together").replace(
    "    size: 320x180\n",
    '    size: 320x180\n    post:\n      inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}\n', 1)


def test_together_drafts_openai_refine_and_replicate_inpaint(prefect_server, tmp_path, monkeypatch):
    """Three backends in one campaign (``hosted-together``): lineage records each inpaint's request, outside the
    mask the inpainted image is its refine exactly, a re-run sends nothing, and no key is on disk."""
    import numpy as np
    from PIL import Image

    from tests.standins import TogetherStandIn

    with OpenAIStandIn(OPENAI_KEY) as o, ReplicateStandIn(REPLICATE_KEY) as r, TogetherStandIn(TOGETHER_KEY) as t:
        for var, value in (("OPENAI_API_KEY", OPENAI_KEY), ("REPLICATE_API_TOKEN", REPLICATE_KEY),
                           ("TOGETHER_API_KEY", TOGETHER_KEY), ("OPENAI_BASE_URL", o.url + "/v1"),
                           ("REPLICATE_BASE_URL", r.url), ("TOGETHER_BASE_URL", t.url)):
            monkeypatch.setenv(var, value)
        folder = with_refs(tmp_path / "brief", ("coffee.jpg",))
        brief = write_brief(folder, INPAINT_BRIEF)
        home = tmp_path / "home"
        counts = []
        for _ in range(2):
            res = CliRunner().invoke(app, ["run", str(brief), "--home", str(home), "--no-report"])
            assert res.exit_code == 0, res.output
            counts.append((len(t.api_requests()), len(o.api_requests()), len(r.api_requests())))
        assert counts == [(5, 3, 2)] * 2  # 3 + 2 drafts, 2 + 1 refines, hero's 2 inpaints; then nothing
    store = open_store(home)
    with store.sessions() as s:
        assets = {a.key: a for a in s.scalars(select(Asset)).all()}
        edges = s.scalars(select(Edge)).all()
        inpaints = [a for a in assets.values() if a.stage == "inpaint"]
        assert len(inpaints) == 2 and all(a.deliverable == "hero" for a in inpaints)
        for a in inpaints:
            facts = a.params["remote"]
            assert facts["backend"] == "replicate" and facts["model"] == "black-forest-labs/flux-fill-pro"
            assert facts["request_id"] and facts["usd"] == 0.05 and facts["params_sent"]["input"]["mask"].startswith("<mask")
            assert a.model["pipeline"]["source"] == "replicate:black-forest-labs/flux-fill-pro"
            parents = {e.role: assets[e.parent] for e in edges if e.child == a.key}
            src, mask = parents["source"], parents["mask"]
            assert src.stage == "refine" and (a.width, a.height) == (src.width, src.height)
            img, before = (np.asarray(Image.open(store.files.path(x.path)).convert("RGB"), dtype=np.int16) for x in (a, src))
            keep = np.asarray(Image.open(store.files.path(mask.path)).convert("L").resize((a.width, a.height))) < 128
            assert np.array_equal(img[keep], before[keep]) and not np.array_equal(img[~keep], before[~keep])
        drafts = [a for a in assets.values() if a.stage == "draft"]
        assert len(drafts) == 5 and all(a.params["remote"]["backend"] == "together" for a in drafts)
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in files if TOGETHER_KEY.encode() in p.read_bytes() or REPLICATE_KEY.encode() in p.read_bytes()]
