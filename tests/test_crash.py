"""Crash safety: kill -9 a real ``atelier run`` at many points, check the store, resume, compare lineage.

Kill points, drawn from a seeded generator (``ATELIER_CRASH_SEED``; ``ATELIER_CRASH_POINTS=N`` runs N
points instead of the default 20, for a slow mode), cycle through six kinds:

- ``time``: SIGKILL from this test once the run has stored k more asset files, after a random delay:
  the run is then in the next stage's model call (model calls are nearly all of a run's time);
- the fault hook in ``store.lineage.save`` (``ATELIER_FAULT`` at the run's N-th save): ``after-stage``
  (files in ``assets/.tmp``, no rows), ``before-commit`` (rows inserted, COMMIT not sent), ``in-commit``
  (a timer thread kills while COMMIT runs), ``after-commit`` (committed, no file moved into place),
  ``mid-publish`` (first file moved, the others not).

Acceptable after a kill -9, checked by ``store.doctor.check`` with ``stale_after=0`` (no run is alive, so
every temp file is debris): exactly the kinds in ``ACCEPTABLE_AFTER_KILL`` — the killed run still
"running" (``dead-run``), its temp files (``stale-temp``) and rows it committed whose bytes are still in
``assets/.tmp`` (``unpublished``). A missing file, a wrong hash, a stray file, a dangling reference or a
SQLite error fails the test. The fault kills also prove they hit their window (after-commit leaves an
unpublished row, unless the save's rows have a parent's bytes, as a selection's do, which are on disk
already; the earlier points leave temp files); ``test_the_fault_hook_kills_save_in_its_window``
checks each window exactly, in a process that only saves.

Crashes are chained on one home: each run resumes the work of the killed one before it and may be
killed in turn (a point is moved to fall within the work the home has left); the last run of a chain
completes. Its lineage (asset keys of the completed run, with the sha256 of their rows and files) must
equal that of a run that never crashed, and ``atelier doctor --repair`` must leave the home healthy.
Points a home has no work left for go on to a fresh home. Two homes run at a time (2 CPU cores; each run
uses one torch thread, as does the reference run, so that floating-point results are comparable).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import select

from store import open_store
from store.doctor import check
from store.files import file_sha256
from store.schema import Asset, Edge, Run, RunAsset, StageRun
from tests.conftest import DEMO_REFS

ATELIER = str(Path(sys.executable).with_name("atelier"))
ACCEPTABLE_AFTER_KILL = {"dead-run", "stale-temp", "unpublished"}
KINDS = ("time", "after-stage", "before-commit", "in-commit", "after-commit", "mid-publish")
POINTS = int(os.environ.get("ATELIER_CRASH_POINTS", "20"))
SEED = int(os.environ.get("ATELIER_CRASH_SEED", "20261122"))
CHAIN = 7  # crash points per home, before a run is let through to completion

# One deliverable through every stage; two kept drafts, so saves of several files exist (mid-publish).
BRIEF = """\
campaign: crash
profile: tiny
seed: 11
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 3
    keep: 2
    size: 128x128
    post:
      inpaint: {region: [0.5, 0.0, 0.5, 0.5], prompt: "plain wall"}
      face_restore: true
      upscale: true
"""


# ------------------------------------------------------------------------------ helpers (shared with
# tests/test_concurrency.py): one real Prefect server, pre-built tiny models, `atelier run` subprocesses.
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """``prefect server start`` on loopback, with its own PREFECT_HOME; runs use it via PREFECT_API_URL."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
        self.log = folder / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                 "--no-services", "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return self.url
            except OSError:
                assert self.proc.poll() is None, f"prefect server exited:\n{self.log.read_text()[-3000:]}"
                time.sleep(0.25)
        raise AssertionError(f"prefect server not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def build_tiny_models(models_dir: Path) -> Path:
    """The tiny profile's models, built once (seeded: byte-identical wherever they are built)."""
    from atelier.profiles import PROFILES
    from atelier.sources import resolve

    prof = PROFILES["tiny"]
    for role in ("draft_model", "refine_model", "ip_adapter", "clip", "face", "upscale"):
        resolve(getattr(prof, role), models_dir)
    return models_dir


def write_brief(folder: Path, text: str, name: str) -> Path:
    refs = folder / "refs"
    if not refs.exists():
        refs.mkdir(parents=True)
        for ref in ("coffee.jpg", "chelsea.jpg"):
            shutil.copy(DEMO_REFS / ref, refs / ref)
    path = folder / name
    path.write_text(text)
    return path


def new_home(folder: Path, models: Path | None) -> Path:
    """An empty atelier home; ``models`` (pre-built) is linked in, so no run builds models."""
    folder.mkdir(parents=True)
    if models is not None:
        (folder / "models").symlink_to(models, target_is_directory=True)
    return folder


def run_env(api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_FAULT", "PREFECT_"))}
    env.update(PREFECT_API_URL=api_url, PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="160", **extra)
    return env


def start_run(brief: Path, home: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([ATELIER, "run", str(brief), "--home", str(home), "--no-report"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a run we started, and anything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def completed_lineage(home: Path) -> dict[str, str]:
    """Asset key -> sha256 of the latest completed run; every file is checked against its row."""
    store = open_store(home)
    with store.sessions() as s:
        run = s.scalars(select(Run).where(Run.status == "completed").order_by(Run.started_at.desc())).first()
        assert run is not None, f"no completed run in {home}"
        rows = s.execute(select(Asset.key, Asset.path, Asset.sha256).join(RunAsset, RunAsset.asset_key == Asset.key)
                         .where(RunAsset.run_id == run.id)).all()
    for key, path, sha in rows:
        assert file_sha256(home / path) == sha, f"{key}: {path} does not hold its recorded bytes"
    return {key: sha for key, _, sha in rows}


def doctor_cli(home: Path, *args: str) -> tuple[int, dict]:
    res = subprocess.run([ATELIER, "doctor", "--home", str(home), "--json", *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


# ---------------------------------------------------------------------------------------- crash points
@dataclass(frozen=True)
class Point:
    kind: str  # one of KINDS
    n: int  # fault: the run's n-th save() call; time: kill once n more asset files are in place
    delay: float  # time: seconds after that; in-commit: ms before the timer thread kills

    def env(self) -> dict[str, str]:
        if self.kind == "time":
            return {}
        env = {"ATELIER_FAULT": self.kind, "ATELIER_FAULT_AFTER": str(self.n)}
        if self.kind == "in-commit":
            env["ATELIER_FAULT_DELAY_MS"] = f"{self.delay:.3f}"
        return env

    def within(self, saves: int, files: int) -> Point:
        """This point, moved to fall within what a run still has to do (``saves`` calls, ``files`` files)."""
        return replace(self, n=min(self.n, saves if self.kind != "time" else max(files - 1, 0)))

    def __str__(self) -> str:
        return f"{self.kind}@{self.n}" + (f"+{self.delay:.2f}" if self.kind in ("time", "in-commit") else "")


def crash_points(count: int, seed: int) -> list[Point]:
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]  # every kind at least count // 6 times
    rng.shuffle(kinds)
    # in-commit: a timer 0-0.4 ms after COMMIT starts lands before, inside or just after it (measured)
    return [Point(k, rng.randint(0, 3), rng.uniform(0.0, 1.5)) if k == "time"
            else Point(k, rng.choice((1, 1, 1, 2, 2, 3)), rng.uniform(0.0, 0.4)) for k in kinds]


@dataclass
class Reference:
    """The run that never crashed."""

    lineage: dict[str, str]  # asset key -> sha256
    stages: dict[str, set[str]]  # stage -> keys: a run makes one save() per stage with something missing
    files: set[str]  # asset files, relative to the home


def reference_run(brief: Path, home: Path, api_url: str, log: Path) -> Reference:
    proc = start_run(brief, home, run_env(api_url), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    lineage = completed_lineage(home)
    with open_store(home).sessions() as s:
        rows = s.execute(select(Asset.key, Asset.stage).where(Asset.key.in_(lineage))).all()
    stages: dict[str, set[str]] = {}
    for key, stage in rows:
        stages.setdefault(stage, set()).add(key)
    return Reference(lineage, stages, _asset_files(home))


def work_left(home: Path, ref: Reference) -> tuple[int, int]:
    """(save() calls, asset files) a run of the brief still has to make on ``home``."""
    with open_store(home).sessions() as s:
        present = {a.key for a in s.scalars(select(Asset)) if (home / a.path).exists()}
    return sum(not keys <= present for keys in ref.stages.values()), len(ref.files - _asset_files(home))


def _asset_files(home: Path) -> set[str]:
    root = home / "assets"
    if not root.exists():
        return set()
    return {str(p.relative_to(home)) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


def _running(home: Path) -> int:
    with open_store(home).sessions() as s:
        return len(s.scalars(select(Run.id).where(Run.status == "running")).all())


def _newest_row_shares_its_parents_bytes(home: Path) -> bool:
    """Whether the newest row the latest run committed has the bytes of a parent (a selection or a pick: one
    file on disk for both), so that a kill between its COMMIT and the rename leaves no file in assets/.tmp."""
    with open_store(home).sessions() as s:
        run = s.scalars(select(Run).order_by(Run.started_at.desc())).first()
        newest = s.scalars(select(Asset).join(RunAsset, RunAsset.asset_key == Asset.key)
                           .where(RunAsset.run_id == run.id, RunAsset.status == "computed")
                           .order_by(Asset.created_at.desc())).first()
        if newest is None:
            return False
        parents = s.scalars(select(Asset.sha256).join(Edge, Edge.parent == Asset.key)
                            .where(Edge.child == newest.key)).all()
        return newest.sha256 in parents and (home / newest.path).exists()


def _stage_reached(home: Path) -> str:
    """The stage the latest run was in when it died: the one after the last it recorded as done."""
    with open_store(home).sessions() as s:
        run = s.scalars(select(Run).order_by(Run.started_at.desc())).first()
        if run is None:
            return "before the run started"
        done = s.scalars(select(StageRun.stage).where(StageRun.run_id == run.id).order_by(StageRun.id)).all()
    return f"after {done[-1]}" if done else "in moodboard"


@dataclass
class Outcome:
    point: Point
    killed: bool
    seconds: float
    found: Counter  # problem kinds the doctor found right after
    stage: str = ""

    def __str__(self) -> str:
        return (f"{str(self.point):20} {'killed' if self.killed else 'completed':9} {self.seconds:5.1f}s "
                f"{self.stage:22} {dict(self.found)}")


def crash_once(point: Point, brief: Path, home: Path, api_url: str, log: Path) -> Outcome:
    """One run with ``point`` armed; whether it died, and what the doctor finds after it (asserted)."""
    dead_before = _running(home)  # runs killed earlier on this home (nothing else runs on it)
    t0 = time.monotonic()
    proc = start_run(brief, home, run_env(api_url, **point.env()), log)
    if point.kind == "time":
        target = len(_asset_files(home)) + point.n
        while proc.poll() is None and len(_asset_files(home)) < target:
            time.sleep(0.05)
        time.sleep(point.delay)
        if proc.poll() is None:
            kill(proc)
    rc = proc.wait(timeout=600)
    seconds = time.monotonic() - t0
    if rc == 0:
        return Outcome(point, False, seconds, Counter())
    assert rc == -signal.SIGKILL, f"{point}: run failed with exit code {rc}:\n{log.read_text()[-3000:]}"
    report = check(open_store(home), stale_after=0)
    found = Counter(p.kind for p in report.problems)
    details = "\n".join(f"{p.kind} {p.subject}: {p.detail}" for p in report.problems)
    assert set(found) <= ACCEPTABLE_AFTER_KILL, f"{point}: unexpected problems after kill -9:\n{details}"
    new_dead = found["dead-run"] - dead_before
    assert new_dead in (0, 1), f"{point}: {details}"
    if point.kind != "time":  # the fault fired inside save(), after start_run: the run is there, dead
        assert new_dead == 1, f"{point}: {details}"
    if point.kind == "after-commit":  # committed rows wait in assets/.tmp, unless their bytes are on disk already
        assert found["unpublished"] >= 1 or _newest_row_shares_its_parents_bytes(home), \
            f"{point}: committed rows should wait in assets/.tmp:\n{details}"
    if point.kind in ("after-stage", "before-commit"):
        assert found["stale-temp"] + found["unpublished"] >= 1, f"{point}: staged files should be left:\n{details}"
    return Outcome(point, True, seconds, found, _stage_reached(home))


# ----------------------------------------------------------------------------------------------- tests
# The fault hook, in a process that only saves: each point stops save() exactly in its window.
SAVER = """
import sys
from pathlib import Path
from store import NewAsset, lineage, open_store, save
store = open_store(Path(sys.argv[1]))
lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
for n in (1, 2):
    save(store, "run1", [NewAsset(key=f"k{n}{i}", stage="draft", kind="image", campaign="c", deliverable="d",
                                  data=b"save %d file %d" % (n, i), suffix=".png", params={}) for i in (1, 2)])
"""


@pytest.mark.parametrize("point, rows, in_place, in_tmp", [
    ("after-stage", 2, 2, 2),  # save 2: both files staged, no rows
    ("before-commit", 2, 2, 2),  # rows inserted but never committed: rolled back
    ("after-commit", 4, 2, 2),  # rows committed, files still in assets/.tmp
    ("mid-publish", 4, 3, 1),  # the first file moved into place
    ("in-commit", None, None, None),  # killed by a timer while committing: either side, never in between
])
def test_the_fault_hook_kills_save_in_its_window(tmp_path, point, rows, in_place, in_tmp) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_FAULT")}
    res = subprocess.run([sys.executable, "-c", SAVER, str(home)], env={**env, "ATELIER_FAULT": point,
                                                                        "ATELIER_FAULT_AFTER": "2"})
    assert res.returncode == -signal.SIGKILL
    store = open_store(home)
    with store.sessions() as s:
        stored = len(s.scalars(select(Asset.key)).all())
    files, temps = len(_asset_files(home)), len(list(store.files.tmp_dir.iterdir()))
    if rows is None:
        assert (stored, files + temps) in ((2, 4), (4, 4)) and files >= 2
    else:
        assert (stored, files, temps) == (rows, in_place, in_tmp)
    found = check(store, stale_after=0)
    assert found.kinds() <= ACCEPTABLE_AFTER_KILL and "dead-run" in found.kinds()
    assert ("unpublished" in found.kinds()) == (stored == 4 and files < 4)
    assert not _newest_row_shares_its_parents_bytes(home)  # rows of their own bytes: the usual case


SELECTS = """
import sys
from pathlib import Path
from store import NewAsset, lineage, open_store, save
store = open_store(Path(sys.argv[1]))
lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
draft = NewAsset(key="d1", stage="draft", kind="image", campaign="c", deliverable="d", data=b"draft", suffix=".png",
                 params={})
save(store, "run1", [draft])
save(store, "run1", [NewAsset(key="s1", stage="select", kind="image", campaign="c", deliverable="d", data=b"draft",
                              suffix=".png", params={"rank": 1}, parents=(("d1", "source"),))])
"""


def test_after_commit_a_save_of_its_parents_bytes_leaves_no_file_waiting(tmp_path) -> None:
    """Why the chained test accepts an after-commit kill without an unpublished row: a selection's row has
    its draft's bytes, so the file it names is in place already and nothing waits in assets/.tmp."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_FAULT")}
    res = subprocess.run([sys.executable, "-c", SELECTS, str(home)],
                         env={**env, "ATELIER_FAULT": "after-commit", "ATELIER_FAULT_AFTER": "2"})
    assert res.returncode == -signal.SIGKILL
    store = open_store(home)
    with store.sessions() as s:
        assert {a.key for a in s.scalars(select(Asset))} == {"d1", "s1"}  # the select row is committed
    found = check(store, stale_after=0)
    assert "unpublished" not in found.kinds() and found.kinds() <= ACCEPTABLE_AFTER_KILL
    assert _newest_row_shares_its_parents_bytes(home)


def test_without_a_fault_nothing_is_killed(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_FAULT")}
    res = subprocess.run([sys.executable, "-c", SAVER, str(tmp_path / "home")], env={**env, "ATELIER_FAULT_AFTER": "2"})
    assert res.returncode == 0 and len(_asset_files(tmp_path / "home")) == 4


def test_a_rerun_after_a_crash_between_commit_and_rename_keeps_the_committed_bytes(tmp_path) -> None:
    from store import NewAsset, lineage, save

    store = open_store(tmp_path / "home")
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    asset = NewAsset(key="k", stage="refine", kind="image", campaign="c", deliverable="d", data=b"first bytes",
                     suffix=".png", params={})
    save(store, "run1", [asset])
    final = store.home / "assets" / _sha(b"first bytes")[:2] / f"{_sha(b'first bytes')}.png"
    os.replace(final, store.files.tmp_dir / f"{final.stem}.abcdef.png")  # as if killed before the rename
    # The next run recomputes k; its bytes differ (say, another batch size): the committed bytes win.
    lineage.start_run(store, "run2", "c", "brief.yaml", "0" * 64, "tiny", {})
    save(store, "run2", [replace(asset, data=b"second bytes")])
    assert final.read_bytes() == b"first bytes" and list(store.files.tmp_dir.iterdir()) == []
    with store.sessions() as s:
        assert s.get(Asset, "k").sha256 == _sha(b"first bytes")
        assert s.get(RunAsset, ("run2", "k")).status == "reused"
    assert _asset_files(store.home) == {str(final.relative_to(store.home))}  # no stray second file


def test_a_rerun_replaces_bytes_that_are_gone(tmp_path) -> None:
    from store import NewAsset, lineage, save

    store = open_store(tmp_path / "home")
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    asset = NewAsset(key="k", stage="refine", kind="image", campaign="c", deliverable="d", data=b"first bytes",
                     suffix=".png", params={"faces": [1]})
    save(store, "run1", [asset])
    (store.home / "assets" / _sha(b"first bytes")[:2] / f"{_sha(b'first bytes')}.png").unlink()
    lineage.start_run(store, "run2", "c", "brief.yaml", "0" * 64, "tiny", {})
    save(store, "run2", [replace(asset, data=b"second bytes", params={"faces": []})])
    with store.sessions() as s:
        row = s.get(Asset, "k")
        assert (row.sha256, row.params, row.run_id) == (_sha(b"second bytes"), {"faces": []}, "run2")
        assert (store.home / row.path).read_bytes() == b"second bytes"
        assert s.get(RunAsset, ("run2", "k")).status == "computed"
    assert check(store).healthy


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    server = PrefectServer(tmp_path_factory.mktemp("prefect"))
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


@pytest.mark.slow  # 20 killed and resumed runs
def test_kill_9_at_many_points_then_resume_gives_the_lineage_of_an_uninterrupted_run(prefect_api, tmp_path) -> None:
    t_start = time.monotonic()
    models = build_tiny_models(tmp_path / "models")
    brief = write_brief(tmp_path / "brief", BRIEF, "crash.yaml")
    points = crash_points(POINTS, SEED)
    chains = [points[i:i + CHAIN] for i in range(0, POINTS, CHAIN)]  # points per home; unused ones move on
    ready = threading.Event()
    ref: list[Reference] = []
    results: list[tuple[Path, list[Outcome]]] = []
    lock = threading.Lock()

    def reference() -> None:
        ref.append(reference_run(brief, new_home(tmp_path / "reference", models), prefect_api,
                                 tmp_path / "reference.log"))
        ready.set()

    def chain(index: int) -> None:
        """Kill runs on a fresh home until its points run out or it has nothing left to do, then complete it."""
        home, points, outcomes = new_home(tmp_path / f"home-{index}", models), chains[index], []
        for i, point in enumerate(points):
            if i > 0:  # a fresh home has more to do than any point asks for
                ready.wait()
                saves, files = work_left(home, ref[0])
                if saves == 0:
                    break
                point = point.within(saves, files)
            outcome = crash_once(point, brief, home, prefect_api, tmp_path / f"chain{index}-{i}-{point.kind}.log")
            outcomes.append(outcome)
            print(f"  home-{index} {outcome}", flush=True)
            if not outcome.killed:  # it completed first: the point goes to the next home
                break
        killed = sum(o.killed for o in outcomes)
        with lock:
            if killed < len(points):
                chains.append(points[killed:])
        if not outcomes or outcomes[-1].killed:
            t0 = time.monotonic()
            log = tmp_path / f"chain{index}-final.log"
            assert start_run(brief, home, run_env(prefect_api), log).wait(timeout=600) == 0, log.read_text()[-3000:]
            outcomes.append(Outcome(Point("final", 0, 0.0), False, time.monotonic() - t0, Counter()))
        results.append((home, outcomes))

    # 1. The reference run, and chains of kills two at a time.
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(reference)]
        started = 0
        while True:
            with lock:
                while started < len(chains):
                    futures.append(pool.submit(chain, started))
                    started += 1
            if all(f.done() for f in futures) and started == len(chains):
                break
            for f in futures:
                if f.done():
                    f.result()  # a failed chain fails the test now
            time.sleep(0.2)
        for f in futures:
            f.result()
    # 2. Every home ends with the lineage of the uninterrupted run; only crash debris is left, and
    #    `atelier doctor --repair` clears it.
    expected = ref[0].lineage
    assert len(expected) > 10 and len(ref[0].stages) >= 5
    for home, _ in results:
        assert completed_lineage(home) == expected, f"{home}: lineage differs from the uninterrupted run"
        after = check(open_store(home), stale_after=0)
        assert after.kinds() <= {"dead-run", "stale-temp"}, [(p.kind, p.subject, p.detail) for p in after.problems]
        rc, repaired = doctor_cli(home, "--repair", "--stale-minutes", "0")
        assert rc == 0 and repaired["healthy"], repaired
        assert {p["kind"] for p in repaired["found"]} == after.kinds()
        assert check(open_store(home), stale_after=0).healthy
        assert _running(home) == 0 and not list((home / "assets" / ".tmp").iterdir())
    # 3. Every point killed a run, every kind of point several times.
    kills = [o for _, outcomes in results for o in outcomes if o.killed]
    print(f"\n{len(kills)} kills on {len(results)} homes in {time.monotonic() - t_start:.0f}s "
          f"(ATELIER_CRASH_POINTS={POINTS}, ATELIER_CRASH_SEED={SEED})")
    by_kind = Counter(o.point.kind for o in kills)
    assert len(kills) == POINTS and all(by_kind[k] >= POINTS // len(KINDS) for k in KINDS), by_kind
