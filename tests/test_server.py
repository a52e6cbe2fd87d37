"""The home's lasting Prefect server (`atelier server`, reused by `atelier run`): one per home, started once
even by runs starting together, never another home's, replaced when stale, and a run whose server is killed
fails in one line and the next run recovers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from atelier import server as srv
from tests.conftest import REPO, tiny_home, with_refs, write_brief

BRIEF = """\
campaign: {name}
profile: tiny
seed: 3
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: main
    prompt: "{prompt}"
    drafts: {drafts}
    keep: 1
    size: 128x128
"""


def _env() -> dict:
    """The user's environment with no Prefect server configured: `atelier run` uses the home's own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "ATELIER_EPHEMERAL"}


def _atelier(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atelier", *args], env=env or _env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _servers_of(home: Path) -> list[int]:
    """Pids of every `prefect server start` process whose Prefect home is ``home``'s (scanning /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect" in args and b"server" in args and f"PREFECT_HOME={home / 'prefect'}".encode() in env:
            pids.append(int(proc.name))
    return pids


def _run_status(home: Path, run_id: str) -> str | None:
    with sqlite3.connect(home / "lineage.db") as db:
        row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row[0] if row else None


def _flow_runs(api_url: str) -> int:
    req = urllib.request.Request(f"{api_url}/flow_runs/count", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read()))


def _ui_url(output: str) -> str:
    return re.search(r"http://127\.0\.0\.1:\d+", output).group(0)


@pytest.fixture(scope="module")
def homes(models_dir, tmp_path_factory):
    """Homes with the session's tiny models and a brief folder; every server they started is stopped after."""
    root = tmp_path_factory.mktemp("server")
    folder = with_refs(root / "briefs")
    write_brief(folder, BRIEF.format(name="alpha", prompt="a red bicycle", drafts=2), "small.yaml")
    write_brief(folder, BRIEF.format(name="beta", prompt="a cup of coffee", drafts=6), "longer.yaml")
    made = {name: tiny_home(root / name, models_dir) for name in ("a", "b", "c", "d")}
    yield {"folder": folder, **made}
    for home in made.values():
        srv.stop(home)
        for pid in _servers_of(home):  # whatever a failed test left behind
            os.kill(pid, signal.SIGKILL)


def test_configured_api_url_is_the_environment_or_the_active_profile(tmp_path) -> None:
    def configured(**env: str) -> str:
        code = "from atelier.server import configured_api_url; print(configured_api_url())"
        res = subprocess.run([sys.executable, "-c", code], env={**_env(), "PREFECT_HOME": str(tmp_path), **env},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert configured() == "None"  # `atelier run` uses the home's own server
    (tmp_path / "profiles.toml").write_text('active = "work"\n[profiles.work]\n'
                                            'PREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    assert configured() == "http://prefect.internal:4200/api"
    assert configured(PREFECT_PROFILE="other") == "None"
    assert configured(PREFECT_API_URL="http://127.0.0.1:9/api") == "http://127.0.0.1:9/api"


def test_a_stale_record_is_not_used_and_its_pid_is_not_signalled(tmp_path) -> None:
    """After a reboot the recorded pid may be any process: it is neither used nor killed."""
    home = tmp_path / "home"
    home.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        srv._write_state(home, srv.Server(pid=other.pid, port=srv._free_port(), api_url="http://127.0.0.1:9/api",
                                          prefect_home=str(home / "prefect"), started_at="2026-01-01T00:00:00+00:00"))
        assert srv.status(home) is None
        res = _atelier("server", "status", "--home", str(home), timeout=60)
        assert res.returncode == 1 and "not running" in res.stdout
        assert srv.stop(home) is None
        assert other.poll() is None  # not ours: alive
        assert not (home / srv.STATE_FILE).exists()  # forgotten
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_runs_share_one_server_and_recover_from_its_kill(homes) -> None:
    home, folder = homes["a"], homes["folder"]
    small, longer = str(folder / "small.yaml"), str(folder / "longer.yaml")

    # 1. Two runs starting at once in a fresh home: one server (the lock), left running after them.
    procs = [subprocess.Popen([sys.executable, "-m", "atelier", "run", small, "--home", str(home), "--no-report"],
                              env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = " ".join(o for o, _ in outs)
    assert said.count("started this home's Prefect server") == 1, said  # said once, with how to stop it
    assert f"atelier server stop --home {home}" in " ".join(said.split())
    first = srv.status(home)
    assert first is not None and _servers_of(home) == [first.pid]
    assert said.count(first.ui_url) == 2
    assert _flow_runs(first.api_url) == 2  # both runs are in the server's database (its UI)

    # 2. The server is killed (-9) during a run: the run fails in one line, marked failed, exit 1.
    run = subprocess.Popen([sys.executable, "-m", "atelier", "run", longer, "--home", str(home), "--no-report"],
                           env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = None
    deadline = time.monotonic() + 300
    while run_id is None and time.monotonic() < deadline and run.poll() is None:
        with sqlite3.connect(home / "lineage.db") as db:
            row = db.execute("SELECT id FROM runs WHERE status = 'running' AND campaign = 'beta'").fetchone()
        run_id = row[0] if row else None
        time.sleep(0.1)
    assert run_id is not None, run.communicate()
    os.kill(first.pid, signal.SIGKILL)
    killed = time.monotonic()
    out, errs = run.communicate(timeout=120)
    assert run.returncode == 1, out + errs
    assert time.monotonic() - killed < 30
    assert "Traceback" not in errs, errs
    failed = [line for line in errs.splitlines() if "failed" in line]
    assert len(failed) == 1 and "Prefect server" in failed[0] and run_id in failed[0], errs
    assert _run_status(home, run_id) == "failed"

    # 3. The next run sees the stale record, starts a new server and completes; the store is healthy.
    res = _atelier("run", longer, "--home", str(home), "--no-report")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started this home's Prefect server" in res.stdout
    second = srv.status(home)
    assert second is not None and second.pid != first.pid and _servers_of(home) == [second.pid]
    doctor = _atelier("doctor", "--home", str(home), timeout=120)
    assert doctor.returncode == 0 and "healthy" in doctor.stdout, doctor.stdout + doctor.stderr


@pytest.mark.slow
def test_server_commands_and_another_homes_server_is_never_used(homes) -> None:
    a, b, c = homes["a"], homes["b"], homes["c"]
    server, _ = srv.ensure(a)  # running already after the test above; started here when run alone

    # start / status: the UI URL, served
    res = _atelier("server", "start", "--home", str(a), timeout=300)
    assert res.returncode == 0 and "already running" in res.stdout and server.ui_url in res.stdout, res.stdout
    res = _atelier("server", "status", "--home", str(a), timeout=60)
    assert res.returncode == 0 and f"UI {server.ui_url}" in res.stdout
    with urllib.request.urlopen(server.ui_url, timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    assert json.loads(_atelier("server", "status", "--home", str(a), "--json", timeout=60).stdout)["pid"] == server.pid

    # home b's record names home a's server (copied), or claims it for b (forged): neither is used nor stopped
    srv._write_state(b, server)
    assert srv.status(b) is None
    forged = dataclasses.replace(server, prefect_home=str(c / "prefect"))
    srv._write_state(c, forged)
    assert srv.status(c) is None
    for home in (b, c):
        res = _atelier("server", "stop", "--home", str(home), timeout=60)
        assert res.returncode == 0 and "no Prefect server runs" in res.stdout
    assert srv.status(a) == server  # still up

    # PREFECT_API_URL set: the run uses that server, and starts none of its own
    before = _flow_runs(server.api_url)
    res = _atelier("run", str(homes["folder"] / "small.yaml"), "--home", str(homes["d"]), "--no-report",
                   env={**_env(), "PREFECT_API_URL": server.api_url})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Prefect: {server.api_url}" in res.stdout and "started" not in res.stdout
    assert not (homes["d"] / srv.STATE_FILE).exists() and _servers_of(homes["d"]) == []
    assert _flow_runs(server.api_url) == before + 1

    # stop
    res = _atelier("server", "stop", "--home", str(a), timeout=120)
    assert res.returncode == 0 and f"stopped the Prefect server at {server.ui_url}" in res.stdout
    assert _servers_of(a) == [] and not srv.alive(server)
    res = _atelier("server", "status", "--home", str(a), timeout=60)
    assert res.returncode == 1 and "not running" in res.stdout
