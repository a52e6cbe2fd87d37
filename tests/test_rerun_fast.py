"""The unchanged re-run without Prefect (``atelier.fastpath``): taken when nothing changed, and only then.

One home, on the tiny profile: a cold run and a normal re-run through the flow (Prefect's test server), then
re-runs that the fast path answers (in a subprocess, to see what it imports; and in this process, against the
test server's REST API), then the cases that must run the flow. The tests after ``runs`` share its home and
run in this file's order; the one that leaves a review gate open is last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from atelier import fastpath
from atelier.brief import load_brief
from atelier.cli import app
from store import open_store, queries
from store.schema import Run
from tests.conftest import REPO, with_refs, write_brief

BRIEF = """\
campaign: quick
profile: tiny
seed: 3
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 128x128
"""

# Runs the CLI, then writes the names of every module the process imported to $MODULES_OUT.
CLI_WITH_MODULES = ("import atexit, json, os, sys\n"
                    "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
                    "from atelier.cli import main\n"
                    "sys.argv[0] = 'atelier'\n"
                    "main()\n")


class _FakePrefect(BaseHTTPRequestHandler):
    """Answers the three POSTs the fast path sends to a Prefect API, and keeps them."""

    posts: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append((self.path, body))
        data = json.dumps({"id": f"id-{len(self.posts)}"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def _latest(home: Path) -> Run:
    with open_store(home).sessions() as s:
        return queries.latest_run(s)


def _invoke(home: Path, brief: Path, *args: str) -> Run:
    res = CliRunner().invoke(app, ["run", str(brief), "--home", str(home), "--no-report", *args])
    assert res.exit_code == 0, res.output
    return _latest(home)


def _decision(home: Path, brief: Path) -> fastpath.Decision:
    campaign, st = load_brief(brief), open_store(home)
    return fastpath.check(st, campaign, fastpath.fingerprint(campaign, "tiny", None, False, st, home))


def _report(home: Path, run_id: str) -> dict:
    """The run's report as JSON, less what differs between any two runs (ids, times, seconds), and the device:
    a re-run in this process finds torch imported by the cold run (``device_used``), one in its own process not."""
    res = CliRunner().invoke(app, ["report", run_id, "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output

    def strip(x):  # noqa: ANN001, ANN202
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("id", "started_at", "finished_at", "seconds", "device")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(res.output))


def _membership(home: Path, run_id: str) -> tuple[list, list]:
    """(key, status, final, export path) of each asset of the run; (deliverable, stage, computed, reused) of its stages."""
    with open_store(home).sessions() as s:
        assets = sorted((a.key, ra.status, ra.final, ra.export_path) for ra, a in queries.run_assets(s, run_id))
        stages = sorted((r.deliverable or "", r.stage, r.computed, r.reused) for r in queries.stage_runs(s, run_id))
    return assets, stages


@pytest.fixture(scope="module")
def runs(prefect_server, models_dir, tmp_path_factory):
    """A cold run and a normal re-run (in this process, through the flow), then a re-run in a subprocess
    that the fast path answers, its Prefect API a fake one."""
    folder = with_refs(tmp_path_factory.mktemp("brief"))
    brief = write_brief(folder, BRIEF)
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(models_dir)  # the session's tiny models
    cold = _invoke(home, brief)
    normal = _invoke(home, brief)  # ATELIER_EPHEMERAL=1 (conftest): the fast path steps aside

    _FakePrefect.posts = []
    api = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrefect)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    modules = home / "modules.json"
    env = {**{k: v for k, v in os.environ.items() if k != "ATELIER_EPHEMERAL"},
           "PREFECT_API_URL": f"http://127.0.0.1:{api.server_address[1]}/api", "MODULES_OUT": str(modules),
           "COLUMNS": "200"}  # Rich wraps at 80 columns otherwise
    res = subprocess.run([sys.executable, "-c", CLI_WITH_MODULES, "run", str(brief), "--home", str(home)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    api.shutdown()
    assert res.returncode == 0, res.stdout + res.stderr
    return SimpleNamespace(home=home, brief=brief, cold=cold.id, normal=normal.id, fast=_latest(home).id,
                           output=res.stdout, modules=json.loads(modules.read_text()), posts=list(_FakePrefect.posts))


@pytest.mark.slow
def test_unchanged_rerun_takes_the_fast_path_without_prefect(runs) -> None:
    assert runs.fast not in (runs.cold, runs.normal)
    heavy = [m for m in runs.modules if m.split(".")[0] in ("prefect", "torch", "diffusers", "open_clip")]
    assert heavy == [], heavy[:10]
    info = _latest(runs.home).info
    assert info["fast_path"] is True and info["reused_run"] == runs.normal
    assert info["model_calls"] == {"count": 0, "seconds": 0.0, "by_stage": {}}
    assert f"run {runs.fast} completed" in runs.output and f"unchanged since run {runs.normal}" in runs.output
    assert "per stage" in runs.output  # the usual report follows
    assert (runs.home / "reports" / f"{runs.fast}.html").is_file()


@pytest.mark.slow
def test_fast_rerun_records_what_a_normal_rerun_records(runs) -> None:
    assert _report(runs.home, runs.fast) == _report(runs.home, runs.normal)
    fast_assets, fast_stages = _membership(runs.home, runs.fast)
    normal_assets, normal_stages = _membership(runs.home, runs.normal)
    assert fast_assets == normal_assets and {status for _, status, _, _ in fast_assets} == {"reused"}
    assert fast_stages == normal_stages and all(computed == 0 for _, _, computed, _ in fast_stages)
    with open_store(runs.home).sessions() as s:
        fast, normal = s.get(Run, runs.fast), s.get(Run, runs.normal)
        assert fast.status == "completed" and fast.info["safety"] == normal.info["safety"]
        assert fast.info["fingerprint"] == normal.info["fingerprint"]  # and the next re-run is fast too


@pytest.mark.slow
def test_fast_rerun_is_a_completed_flow_run_in_prefect(runs) -> None:
    paths = [p for p, _ in runs.posts]
    assert paths == ["/api/flows/", "/api/flow_runs/", "/api/artifacts/"], paths
    flow, flow_run, artifact = (body for _, body in runs.posts)
    assert flow == {"name": "campaign"}
    assert flow_run["state"]["type"] == "COMPLETED" and flow_run["parameters"]["run_id"] == runs.fast
    assert artifact["flow_run_id"] == "id-2" and f"{runs.fast}.html" in artifact["data"]


@pytest.mark.slow
def test_fast_rerun_against_a_real_prefect_server(runs, monkeypatch) -> None:
    """In this process (Prefect's test server configured): the same REST calls, which Prefect accepts."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    monkeypatch.delenv("ATELIER_EPHEMERAL", raising=False)
    run = _invoke(runs.home, runs.brief)
    assert run.info.get("fast_path") is True
    found = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json={"limit": 20, "sort": "START_TIME_DESC"})
    mine = [fr for fr in found.json() if fr["parameters"].get("run_id") == run.id]
    assert [fr["state"]["type"] for fr in mine] == ["COMPLETED"], found.json()[:2]


@pytest.mark.slow
def test_not_taken_when_the_brief_changes(runs) -> None:
    assert _decision(runs.home, runs.brief).previous is not None
    changed = write_brief(runs.brief.parent, BRIEF.replace("red bicycle", "blue bicycle"), name="changed.yaml")
    assert "changed since" in _decision(runs.home, changed).reason


@pytest.mark.slow
def test_not_taken_when_an_input_image_changes(runs) -> None:
    ref = runs.brief.parent / "refs" / "coffee.jpg"
    saved = ref.read_bytes()
    try:
        shutil.copy(runs.brief.parent / "refs" / "chelsea.jpg", ref)
        assert _decision(runs.home, runs.brief).previous is None
    finally:
        ref.write_bytes(saved)
    assert _decision(runs.home, runs.brief).previous is not None


@pytest.mark.slow
def test_a_deleted_final_is_restored_by_the_normal_path(runs, monkeypatch) -> None:
    monkeypatch.delenv("ATELIER_EPHEMERAL", raising=False)  # the fast path is considered, and declines
    final = runs.home / "outputs" / "quick" / "hero-1.png"
    final.unlink()
    assert "hero-1.png changed or is gone" in _decision(runs.home, runs.brief).reason
    run = _invoke(runs.home, runs.brief)
    assert "fast_path" not in run.info and run.info["model_calls"]["count"] == 0 and final.is_file()
    assert _decision(runs.home, runs.brief).previous == run.id  # recorded anew: the next re-run is fast


@pytest.mark.slow
def test_force_takes_the_normal_path(runs, monkeypatch) -> None:
    monkeypatch.delenv("ATELIER_EPHEMERAL", raising=False)
    run = _invoke(runs.home, runs.brief, "--force", "refine")
    assert "fast_path" not in run.info and run.info["model_calls"]["by_stage"].get("refine") == 1


@pytest.mark.slow
def test_an_open_review_gate_takes_the_normal_path(runs, monkeypatch) -> None:
    monkeypatch.delenv("ATELIER_EPHEMERAL", raising=False)
    gated = _invoke(runs.home, runs.brief, "--review")
    assert gated.status == "awaiting review" and "fast_path" not in gated.info
    assert "awaiting review" in _decision(runs.home, runs.brief).reason
    run = _invoke(runs.home, runs.brief)
    assert run.status == "completed" and "fast_path" not in run.info


def test_fingerprint_follows_brief_options_and_source(brief_dir) -> None:
    brief = write_brief(brief_dir, BRIEF)
    campaign, home = load_brief(brief), brief_dir / "home"
    st = SimpleNamespace(url="sqlite:///x.db", files=SimpleNamespace(location=str(home / "assets")))
    base = fastpath.fingerprint(campaign, "tiny", None, False, st, home)
    assert base == fastpath.fingerprint(load_brief(brief), "tiny", None, False, st, home)
    assert base != fastpath.fingerprint(campaign, "tiny", "refine", False, st, home)
    assert base != fastpath.fingerprint(campaign, "tiny", None, True, st, home)
    assert base != fastpath.fingerprint(campaign, "micro", None, False, st, home)
    other = SimpleNamespace(url="sqlite:///y.db", files=st.files)
    assert base != fastpath.fingerprint(campaign, "tiny", None, False, other, home)
    changed = write_brief(brief_dir, BRIEF.replace("seed: 3", "seed: 4"), name="b2.yaml")
    assert base != fastpath.fingerprint(load_brief(changed), "tiny", None, False, st, home)


def test_a_prefect_api_that_does_not_answer_is_one_line(tmp_path) -> None:
    """The run is recorded anyway; the CLI prints this in one dim line."""
    problem = fastpath.register("http://127.0.0.1:9/api", {"run_id": "r"}, "quick", "p", tmp_path / "r.html",
                                timeout_s=2)
    assert problem and "\n" not in problem
