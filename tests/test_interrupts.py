"""Interrupts: Ctrl-C and SIGTERM stop a run within seconds and leave it ``cancelled``; a full disk fails it.

The slow tests run the real CLI (``tests/test_crash.py``'s helpers: one Prefect server, the tiny models):

- Ctrl-C (SIGINT to the run's process group, as a terminal sends it) once the drafts are stored, then SIGTERM
  to ``atelier resume`` while it refines: each exits within ``EXIT_WITHIN`` seconds with 128 + the signal,
  the run is ``cancelled``, the store is healthy; the next ``atelier run`` completes, computing nothing that
  was committed.
- A full disk: ``FULL_DISK`` runs the CLI with ``os.write`` failing with ENOSPC from the N-th asset file on
  (that file half written, as a filling disk does), so the draft stage's save fails: one line names the
  asset, exit 1, nothing committed is lost, no temp file is left, and a rerun with space completes.

The fast tests check the pieces in this process: a signal during ``save()`` waits for the files to be in
place, a failed write leaves nothing behind, a full disk is not retried.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from atelier import interrupts
from flows.executor import is_transient
from store import NewAsset, lineage, open_store, save
from store.doctor import check
from store.schema import Asset, Run, RunAsset, StageRun
from tests.conftest import tiny_home
from tests.test_crash import (
    ATELIER,
    _asset_files,
    completed_lineage,
    doctor_cli,
    prefect_api,  # noqa: F401 (a fixture)
    run_env,
    write_brief,
)

EXIT_WITHIN = 10.0  # seconds from the signal to the process's exit (~1.5 s measured on a busy 2-core machine)

# One deliverable, small: mood board (2 references + the board), 3 drafts, a selection, one refine.
BRIEF = """\
campaign: interrupts
profile: tiny
seed: 5
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 3
    keep: 1
    size: 64x64
"""

# `atelier` with a disk that fills up: writes to files under FULL_DISK_UNDER fail with ENOSPC from the
# FULL_DISK_AT_FILE-th file on; that file gets half of its first write, as a disk that fills up mid-write.
FULL_DISK = """
import errno, os, sys
root, full_at, files, write = os.environ["FULL_DISK_UNDER"], int(os.environ["FULL_DISK_AT_FILE"]), [], os.write
def full_disk_write(fd, data):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = ""
    if not path.startswith(root):
        return write(fd, data)
    if path not in files:
        files.append(path)
    n = files.index(path) + 1
    if n < full_at:
        return write(fd, data)
    if n == full_at and os.fstat(fd).st_size == 0 and len(data) > 1:
        return write(fd, bytes(data)[:len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.write = full_disk_write
from atelier.cli import main
sys.argv[0] = "atelier"
main()
"""


# ------------------------------------------------------------------------------------------ helpers
def _default_sigint() -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored, and so would the run (Python then
    # installs no KeyboardInterrupt handler): give it the disposition a terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(args: list[str], env: dict[str, str], log: Path, stderr: Path | None = None) -> subprocess.Popen:
    """``args`` in its own process group (SIGINT to the group is a terminal's Ctrl-C)."""
    with open(log, "wb") as out, open(stderr or log, "ab") as err:
        return subprocess.Popen(args, env=env, stdout=out, stderr=err if stderr else subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)


def wait_until(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it got there:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress:\n" + log.read_text()[-3000:]
        time.sleep(0.1)


def interrupt(proc: subprocess.Popen, sig: int, group: bool) -> float:
    """Send ``sig`` (to the process group with ``group``); seconds until the process exited."""
    t0 = time.monotonic()
    os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running 60 s after {signal.Signals(sig).name}") from None
    return time.monotonic() - t0


def only_run(home: Path) -> Run:
    with open_store(home).sessions() as s:
        [run] = s.scalars(select(Run)).all()
        return run


def stage_rows(home: Path, run_id: str) -> int:
    with open_store(home).sessions() as s:
        return s.scalar(select(func.count()).select_from(StageRun).where(StageRun.run_id == run_id))


def assert_healthy(home: Path) -> None:
    """Healthy now, with no process of a run alive: every temp file would count (``stale_after=0``)."""
    report = check(open_store(home), stale_after=0)
    assert report.healthy, [(p.kind, p.subject, p.detail) for p in report.problems]
    rc, data = doctor_cli(home)
    assert rc == 0 and data["healthy"], data
    assert not list((home / "assets" / ".tmp").iterdir())


def stored(home: Path) -> dict[str, str]:
    """Asset key -> sha256 of every row, each file checked against its row."""
    with open_store(home).sessions() as s:
        rows = s.execute(select(Asset.key, Asset.path, Asset.sha256)).all()
    from store.files import file_sha256

    for key, path, sha in rows:
        assert file_sha256(home / path) == sha, f"{key}: {path} does not hold its recorded bytes"
    return {key: sha for key, _, sha in rows}


def next_run_reuses(home: Path, brief: Path, api: str, log: Path, committed: dict[str, str]) -> None:
    """A new `atelier run` of the brief completes, reusing every asset committed before it, bytes unchanged."""
    proc = launch([ATELIER, "run", str(brief), "--home", str(home), "--no-report"], run_env(api), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    final = completed_lineage(home)
    with open_store(home).sessions() as s:
        run = s.scalars(select(Run).where(Run.status == "completed")).one()
        status = dict(s.execute(select(RunAsset.asset_key, RunAsset.status).where(RunAsset.run_id == run.id)).all())
    assert set(committed) <= set(final) and all(final[k] == sha for k, sha in committed.items())
    assert {status[k] for k in committed} == {"reused"}, "something committed before was computed again"
    assert_healthy(home)


# ------------------------------------------------------------------------------------ in this process
def _asset(n: int) -> NewAsset:
    return NewAsset(key=f"k{n}", stage="draft", kind="image", campaign="c", deliverable="hero",
                    data=b"file %d " % n * 1000, suffix=".png", params={})


@pytest.mark.parametrize("sig, where", [(signal.SIGINT, "stage"), (signal.SIGINT, "publish"),
                                        (signal.SIGTERM, "stage"), (signal.SIGTERM, "publish")])
def test_a_signal_during_save_is_held_until_the_files_are_in_place(tmp_path, monkeypatch, sig, where) -> None:
    store = open_store(tmp_path / "home")
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    real = getattr(store.files, where)
    calls = []

    def signalling(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)  # delivered to this (the main) thread
        return real(*args)

    monkeypatch.setattr(store.files, where, signalling)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (pytest may run with SIGINT ignored)
    try:
        with interrupts.terminate_as_interrupt(), pytest.raises(KeyboardInterrupt) as raised:
            save(store, "run1", [_asset(1), _asset(2)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupts.signal_of(raised.value) == sig and len(calls) == 2  # raised after the save, not in it
    assert len(_asset_files(store.home)) == 2 and not list(store.files.tmp_dir.iterdir())
    with store.sessions() as s:
        assert len(s.scalars(select(Asset.key)).all()) == 2
    assert check(store, stale_after=0).healthy  # run1 is "running" in this live process: a note, not a problem


def test_a_full_disk_fails_save_naming_the_asset_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    store = open_store(tmp_path / "home")
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    save(store, "run1", [_asset(1)])
    write, files = os.write, []

    def filling(fd: int, data: bytes) -> int:  # the second file gets half its bytes, then the disk is full
        path = os.readlink(f"/proc/self/fd/{fd}")
        files.extend([path] if path not in files else [])
        if files.index(path) == 0:
            return write(fd, data)
        if os.fstat(fd).st_size == 0:
            return write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", filling)
    with pytest.raises(OSError) as raised:
        save(store, "run1", [_asset(2), _asset(3)])
    monkeypatch.setattr(os, "write", write)
    assert raised.value.errno == errno.ENOSPC and not is_transient(raised.value)
    assert "could not write the draft asset k3 of hero (7,000 bytes)" in str(raised.value)
    assert not list(store.files.tmp_dir.iterdir())  # neither k2's whole file nor k3's half
    with store.sessions() as s:
        assert s.scalars(select(Asset.key)).all() == ["k1"]
    assert check(store, stale_after=0).healthy
    assert is_transient(OSError(errno.EIO, "I/O error"))  # other I/O errors are still retried


def test_a_cancelled_run_is_recorded_once_and_only_by_its_own_process(tmp_path) -> None:
    store = open_store(tmp_path / "home")
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    lineage.finish_run(store, "run1", cancelled="interrupted by SIGINT")
    assert (only_run(store.home).status, only_run(store.home).error) == ("cancelled", "interrupted by SIGINT")
    assert not lineage.cancel_run(store, "run1", "interrupted by SIGTERM")  # not running: left as it is
    lineage.start_run(store, "run1", "c", "brief.yaml", "0" * 64, "tiny", {}, resume=True)
    with store.sessions.begin() as s:
        s.get(Run, "run1").info = {**s.get(Run, "run1").info, "pid": 1}  # as if another process ran it
    assert not lineage.cancel_run(store, "run1", "interrupted by SIGTERM")
    assert only_run(store.home).status == "running"


# ------------------------------------------------------------------------------------ the real CLI
@pytest.mark.slow  # three runs of a small brief (~1.5 min on 2 cores)
def test_ctrl_c_and_sigterm_stop_a_run_within_seconds_and_the_next_run_reuses_what_was_committed(
        prefect_api, models_dir, tmp_path) -> None:  # noqa: F811 (the fixture)
    home = tiny_home(tmp_path / "home", models_dir)
    brief = write_brief(tmp_path / "brief", BRIEF, "brief.yaml")
    env = run_env(prefect_api)
    # 1. Ctrl-C once drafts are stored (mood board: 3 files, then the drafts' save).
    log = tmp_path / "run.log"
    proc = launch([ATELIER, "run", str(brief), "--home", str(home), "--no-report"], env, log)
    wait_until(proc, lambda: len(_asset_files(home)) >= 4, log)
    seconds = interrupt(proc, signal.SIGINT, group=True)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT and seconds < EXIT_WITHIN, (seconds, out[-3000:])
    run = only_run(home)
    assert (run.status, run.error) == ("cancelled", "interrupted by SIGINT")
    assert f"run {run.id} cancelled (SIGINT)" in out and f"atelier resume {run.id}" in out
    assert "Traceback" not in out
    assert_healthy(home)
    # 2. `atelier resume`, SIGTERM once it is past the stages stored already (in the refine's model call).
    before = stage_rows(home, run.id)
    log = tmp_path / "resume.log"
    proc = launch([ATELIER, "resume", run.id, "--home", str(home), "--no-report"], env, log)
    # past the stages stored already: its selection is committed (the safety checks add stage rows too)
    wait_until(proc, lambda: stage_rows(home, run.id) >= before + 3 and _has_stage(home, "select"), log)
    seconds = interrupt(proc, signal.SIGTERM, group=False)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and seconds < EXIT_WITHIN, (seconds, out[-3000:])
    run = only_run(home)
    assert (run.status, run.error, run.info["passes"]) == ("cancelled", "interrupted by SIGTERM", 2)
    assert "model_calls" in run.info and "draft" not in run.info["model_calls"]["by_stage"]  # pass 2 reused them
    assert f"run {run.id} cancelled (SIGTERM)" in out and "Traceback" not in out
    assert_healthy(home)
    # 3. The next run completes, computing nothing that was committed.
    committed = stored(home)
    assert {"reference", "moodboard", "draft", "select"} <= {k for k in _stages(home, committed)}
    next_run_reuses(home, brief, prefect_api, tmp_path / "next.log", committed)


def _has_stage(home: Path, stage: str) -> bool:
    with open_store(home).sessions() as s:
        return s.scalar(select(func.count()).select_from(Asset).where(Asset.stage == stage)) > 0


def _stages(home: Path, keys: dict[str, str]) -> set[str]:
    with open_store(home).sessions() as s:
        return set(s.scalars(select(Asset.stage).where(Asset.key.in_(keys))))


@pytest.mark.slow  # a failed run and a complete one (~1 min on 2 cores)
def test_a_full_disk_fails_the_run_with_one_line_and_a_rerun_with_space_completes(
        prefect_api, models_dir, tmp_path) -> None:  # noqa: F811 (the fixture)
    home = tiny_home(tmp_path / "home", models_dir)
    brief = write_brief(tmp_path / "brief", BRIEF, "brief.yaml")
    # 1. Files 1-3 (2 references, the mood board) fit; the 4th (the first draft) too, the 5th half: the
    #    drafts' save fails.
    env = run_env(prefect_api, FULL_DISK_UNDER=str(home / "assets"), FULL_DISK_AT_FILE="5")
    log, errors = tmp_path / "full.log", tmp_path / "full.err"
    proc = launch([sys.executable, "-c", FULL_DISK, "run", str(brief), "--home", str(home), "--no-report"], env,
                  log, stderr=errors)
    assert proc.wait(timeout=600) == 1, log.read_text()[-2000:] + errors.read_text()[-3000:]
    run = only_run(home)
    lines = [line for line in errors.read_text().splitlines() if line.startswith(f"run {run.id} failed")]
    assert len(lines) == 1 and "Traceback" not in errors.read_text() + log.read_text(), errors.read_text()[-3000:]
    assert "No space left on device: could not write the draft asset" in lines[0] and str(home / "assets") in lines[0]
    assert run.status == "failed" and "No space left on device" in run.error
    # 2. What was committed before is whole; nothing of the failed save is left, not even a temp file.
    committed = stored(home)
    assert _stages(home, committed) == {"reference", "moodboard"} and len(committed) == 3
    assert_healthy(home)
    # 3. With space again, the next run completes and reuses the mood board.
    next_run_reuses(home, brief, prefect_api, tmp_path / "next.log", committed)
