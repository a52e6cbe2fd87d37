"""Scheduled batch production: a real Prefect server, `atelier schedule`, `atelier serve`, triggered ticks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import with_refs

pytestmark = pytest.mark.slow  # whole campaigns through Prefect (make test-fast skips them)

REPO = Path(__file__).resolve().parent.parent

BRIEF = """\
campaign: {name}
profile: tiny
seed: 3
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: main
    prompt: "{prompt}"
    drafts: 2
    keep: 1
    size: 128x128
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on loopback, for this module."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path_factory.mktemp("prefect")), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None, "prefect server exited"
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("prefect server did not become healthy in 180 s")
    env["PREFECT_API_URL"] = url
    yield env
    proc.terminate()
    proc.wait(timeout=30)


def _atelier(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atelier", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _tick(env: dict, deployment: str) -> None:
    """Trigger the deployment now (instead of waiting for cron) and wait for the flow run to finish."""
    code = (f"from prefect.deployments import run_deployment; fr = run_deployment('scheduled-batch/{deployment}', "
            "timeout=600, poll_interval=1); print(fr.state.type.value)")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=660)
    assert res.returncode == 0 and res.stdout.strip().endswith("COMPLETED"), res.stdout + res.stderr


def test_schedule_ticks_run_new_and_changed_briefs_only(server, tmp_path) -> None:
    folder = with_refs(tmp_path / "briefs")
    (folder / "a.yaml").write_text(BRIEF.format(name="alpha", prompt="a red bicycle"))
    (folder / "b.yaml").write_text(BRIEF.format(name="beta", prompt="a cup of coffee"))
    home = tmp_path / "home"

    bad = _atelier(server, "schedule", str(folder), "--cron", "every day", "--home", str(home))
    assert bad.returncode == 2 and "--cron" in bad.stderr
    res = _atelier(server, "schedule", str(folder), "--cron", "0 2 * * *", "--home", str(home))
    assert res.returncode == 0, res.stderr
    assert json.loads((home / "schedules.json").read_text())["batch-briefs"]["cron"] == "0 2 * * *"

    serve = subprocess.Popen([sys.executable, "-m", "atelier", "serve", "--home", str(home)], env=server, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        runs = lambda: json.loads(_atelier(server, "runs", "--home", str(home), "--json").stdout)  # noqa: E731
        _tick(server, "batch-briefs")
        first = runs()
        assert sorted(r["campaign"] for r in first) == ["alpha", "beta"]
        assert all(r["status"] == "completed" for r in first)

        _tick(server, "batch-briefs")  # nothing changed: no new run, so no model call
        assert len(runs()) == 2

        (folder / "b.yaml").write_text(BRIEF.format(name="beta", prompt="a cup of tea"))
        _tick(server, "batch-briefs")
        third = runs()
        assert len(third) == 3 and third[0]["campaign"] == "beta"
        report = json.loads(_atelier(server, "report", third[0]["id"], "--home", str(home), "--json").stdout)
        assert report["stages"]["draft"]["computed"] == 2  # the changed prompt was recomputed
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
