"""Several processes on one home: racing saves, a fresh home opened at once, four real `atelier run`s at once.

SQLite serialises writers. A write transaction that first reads and then writes (``s.get`` → ``s.add``) can
race another process between its check and its insert, or fail with "database is locked" when it upgrades
from reading to writing; ``store.db`` therefore starts write transactions with ``BEGIN IMMEDIATE``. The
first two tests make those races likely (they fail without it); the last runs the real thing on a home
that has nothing yet, not even the tiny models, so that their concurrent build is exercised too.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from store import open_store
from store.schema import Asset, Run, RunAsset
from tests.test_crash import (
    build_tiny_models,
    doctor_cli,
    new_home,
    prefect_api,  # noqa: F401 (a fixture)
    run_env,
    start_run,
    write_brief,
)

pytestmark = pytest.mark.slow  # concurrent runs and processes (make test-fast skips them)

# A worker process: imports `store` (only), waits for the go file, then does its part.
WORKER = """
import sys, time
from pathlib import Path
from store import NewAsset, lineage, open_store, save
home, go, worker, action = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
go.with_name(f"{go.name}.ready{worker}").touch()
while not go.exists():
    time.sleep(0.001)
store = open_store(home)
if action == "save":
    lineage.start_run(store, f"run{worker}", "c", "brief.yaml", "0" * 64, "tiny", {})
    for i in range(150):  # every worker saves the same keys in the same order: they collide on each one
        save(store, f"run{worker}", [NewAsset(key=f"k{i:03d}", stage="draft", kind="image", campaign="c",
                                              deliverable="d", data=b"pixels %d" % (i % 50), suffix=".png",
                                              params={"i": i})])
"""


def _race(home: Path, action: str, workers: int = 4) -> list[tuple[int, str]]:
    go = home.with_name(home.name + ".go")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(home), str(go), str(w), action],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in range(workers)]
    deadline = time.monotonic() + 60
    while len(list(go.parent.glob(f"{go.name}.ready*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all imported and waiting: go
    results = []
    for p in procs:
        lines = p.stdout.read().strip().splitlines() or [""]
        results.append((p.wait(timeout=120), next((line for line in reversed(lines) if "Error" in line), lines[-1])))
    return results


def test_racing_saves_of_the_same_keys_store_each_asset_and_file_once(tmp_path) -> None:
    home = tmp_path / "home"
    open_store(home)
    results = _race(home, "save")
    assert all(rc == 0 for rc, _ in results), [out for rc, out in results if rc]
    store = open_store(home)
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 150
        memberships = s.execute(select(RunAsset.asset_key, RunAsset.status)).all()
        paths = set(s.scalars(select(Asset.path)))
    # every run lists every key; exactly one run computed each, the others reused it
    assert Counter(k for k, _ in memberships) == {f"k{i:03d}": 4 for i in range(150)}
    assert Counter(k for k, status in memberships if status == "computed") == {f"k{i:03d}": 1 for i in range(150)}
    # 50 distinct contents: 50 files, each named by its bytes, nothing left in assets/.tmp
    files = [p for p in (home / "assets").rglob("*") if p.is_file()]
    assert len(paths) == 50 and sorted(str(p.relative_to(home)) for p in files) == sorted(paths)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in files)


def test_processes_opening_a_fresh_home_at_once_all_succeed(tmp_path) -> None:
    for attempt in range(8):  # the CREATE TABLE race needs the processes within milliseconds of each other
        home = tmp_path / f"home{attempt}"
        results = _race(home, "open")
        assert all(rc == 0 for rc, _ in results), [out for rc, out in results if rc]
        tables = set(inspect(open_store(home).sessions.kw["bind"]).get_table_names())
        assert {"runs", "assets", "edges", "run_assets", "scores", "stage_runs"} <= tables


# ---------------------------------------------------------------------------------- four real runs
BRIEF_A = """\
campaign: conc-a
profile: tiny
seed: 21
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 128x128
    post:
      face_restore: true
      upscale: true
"""

BRIEF_B = """\
campaign: conc-b
profile: tiny
seed: 5
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: square
    prompt: "a cup of coffee"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 128x128
    post:
      upscale: true
"""


def _lineage(s, run_id: str) -> dict[str, str]:
    return dict(s.execute(select(Asset.key, Asset.sha256).join(RunAsset, RunAsset.asset_key == Asset.key)
                          .where(RunAsset.run_id == run_id)).all())


def test_four_runs_of_two_briefs_on_one_fresh_home(prefect_api, tmp_path) -> None:  # noqa: F811 (the fixture)
    t0 = time.monotonic()
    folder = tmp_path / "briefs"
    a, b = write_brief(folder, BRIEF_A, "a.yaml"), write_brief(folder, BRIEF_B, "b.yaml")
    home = new_home(tmp_path / "home", models=None)  # nothing yet: the four runs build the tiny models too
    procs = [start_run(brief, home, run_env(prefect_api), tmp_path / f"run{i}.log")
             for i, brief in enumerate((a, a, b, b))]
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(4)]
    seconds = time.monotonic() - t0
    # 1. All four finish, and none met a locked database.
    assert codes == [0, 0, 0, 0], "\n\n".join(log[-3000:] for code, log in zip(codes, logs) if code)
    for log in logs:
        assert "database is locked" not in log.lower() and "Traceback" not in log, log[-3000:]
    # 2. Each asset stored once (computed by one run, reused by the others), each distinct file once.
    store = open_store(home)
    with store.sessions() as s:
        runs = {r.id: r for r in s.scalars(select(Run))}
        assert len(runs) == 4 and {r.status for r in runs.values()} == {"completed"}
        by_brief = {}
        for r in runs.values():
            by_brief.setdefault(Path(r.brief_path).name, []).append(_lineage(s, r.id))
        computed = Counter(s.scalars(select(RunAsset.asset_key).where(RunAsset.status == "computed")))
        rows = s.execute(select(Asset.key, Asset.path, Asset.sha256)).all()
    assert set(computed.values()) == {1} and set(computed) == {key for key, _, _ in rows}
    files = [p for p in (home / "assets").rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(home)) for p in files) == sorted({path for _, path, _ in rows})
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in files)
    # 3. The same brief gave the same lineage twice; the two briefs share their references and mood board.
    (a1, a2), (b1, b2) = by_brief["a.yaml"], by_brief["b.yaml"]
    assert a1 == a2 and b1 == b2 and len(set(a1) & set(b1)) == 3  # 2 references + the mood board
    # 4. The doctor finds nothing, and the tiny models built four times at once came out whole.
    rc, report = doctor_cli(home, "--stale-minutes", "0")
    assert rc == 0 and report["healthy"] and not report["notes"], report
    tiny = home / "models" / "tiny"
    assert not [p.name for p in tiny.iterdir() if p.name.startswith(".")], "a build's temp folder was left behind"
    from atelier.sources import weights_sha256

    reference = build_tiny_models(tmp_path / "models")
    for built in sorted(tiny.iterdir()):
        assert weights_sha256(built) == weights_sha256(reference / "tiny" / built.name), built.name
    print(f"\nfour concurrent runs on one fresh home: {seconds:.0f}s")
