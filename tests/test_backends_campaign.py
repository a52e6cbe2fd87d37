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
from store.schema import Asset
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
