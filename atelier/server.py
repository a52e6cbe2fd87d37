"""The atelier home's own Prefect server: started once in the background, reused by every run.

``atelier run`` used to start Prefect's temporary server each time (~10-20 s of a 1 s re-run) and stop it at
the end, so the UI, where runs and artifacts are recorded, was never up to open. Instead the home keeps one
``prefect server start`` on 127.0.0.1, its database under ``<home>/prefect``:

- ``<home>/prefect-server.json`` records its pid, port, URL and Prefect home, written once it answers;
- ``<home>/prefect-server.lock`` (``flock``) is held while one is checked, started or stopped, so two runs
  starting at once start one server;
- a recorded server is used only when it is alive *and* its API says it is this home's (``/admin/settings``:
  its Prefect home is ``<home>/prefect``). A dead pid, a port now answered by another process or by another
  home's server (after ``kill -9`` or a reboot) is stale: it is replaced, and a live process is signalled only
  when its command line is the recorded ``prefect server start --port N``.

Standard library only (no prefect import): the CLI decides where Prefect points before importing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

STATE_FILE = "prefect-server.json"
LOCK_FILE = "prefect-server.lock"
LOG_FILE = "server.log"  # under <home>/prefect
STARTUP_TIMEOUT_S = 180.0  # a cold `prefect server start` takes 10-20 s, several times that on a busy 2-core machine


class ServerError(RuntimeError):
    """The home's Prefect server could not be started (or stopped); the message is one line for the user."""


@dataclass(frozen=True)
class Server:
    """A running Prefect server of an atelier home (what ``prefect-server.json`` records)."""

    pid: int
    port: int
    api_url: str  # http://127.0.0.1:PORT/api, what PREFECT_API_URL is set to
    prefect_home: str  # its PREFECT_HOME, holding its database: the identity checked through its API
    started_at: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


# --- where Prefect points ----------------------------------------------------------------------------------


def configured_api_url() -> str | None:
    """The Prefect API the user (or an embedding program) configured, or None when Prefect would start its own.

    ``PREFECT_API_URL`` in the environment; else, when prefect is already imported (a test harness, a program
    calling the CLI in-process), its current settings; else the active profile of ``$PREFECT_HOME/profiles.toml``.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect.context" in sys.modules:  # settings are frozen at import: ask them
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    profiles = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "profiles.toml"
    if profiles.is_file():
        import tomllib

        try:
            data = tomllib.loads(profiles.read_text())
        except (OSError, ValueError):
            return None
        active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
        return (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None
    return None


# --- the state file, the lock and the checks ----------------------------------------------------------------


@contextlib.contextmanager
def _locked(home: Path, timeout: float = STARTUP_TIMEOUT_S + 60) -> Iterator[None]:
    """Hold ``<home>/prefect-server.lock``: one process at a time checks, starts or stops the server."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(f"{home / LOCK_FILE}: held by another process for {timeout:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state(home: Path) -> Server | None:
    try:
        return Server(**json.loads((home / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None  # none, or unreadable (a crash mid-write cannot happen: it is replaced atomically)


def _write_state(home: Path, server: Server) -> None:
    tmp = home / f"{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(server), indent=2))
    os.replace(tmp, home / STATE_FILE)


def _is_our_process(server: Server, home: Path) -> bool:
    """Whether ``server.pid`` is alive and is the ``prefect server start`` of this home recorded (not a reused
    pid, nor another home's server that a copied record names)."""
    if server.prefect_home != str(_prefect_home(home)):
        return False
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not ours
    try:
        args = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the pid is alive; the API check decides
    return (b"prefect" in args and b"server" in args and str(server.port).encode() in args
            and f"PREFECT_HOME={server.prefect_home}".encode() in env)


def _api_prefect_home(api_url: str, timeout: float = 2.0) -> str | None:
    """The Prefect home of the server answering at ``api_url`` (from its settings), or None if none answers."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/admin/settings", timeout=timeout) as resp:
            return str(json.loads(resp.read()).get("home"))
    except (OSError, ValueError):
        return None


def _prefect_home(home: Path) -> Path:
    return home / "prefect"


def _healthy(server: Server, home: Path) -> bool:
    """Alive, ours, answering, and this home's: its API reports ``<home>/prefect`` as its Prefect home."""
    return _is_our_process(server, home) and _api_prefect_home(server.api_url) == server.prefect_home


# --- start, stop, status ------------------------------------------------------------------------------------


def status(home: Path) -> Server | None:
    """The home's running server, or None (no record, or a stale one: dead, replaced or another home's)."""
    server = _read_state(home)
    return server if server is not None and _healthy(server, home) else None


def ensure(home: Path) -> tuple[Server, bool]:
    """The home's running server, started if there is none (replacing a stale record); (server, started now)."""
    with _locked(home):
        server = status(home)
        if server is not None:
            return server, False
        _discard_stale(home)
        return _start(home), True


def stop(home: Path) -> Server | None:
    """Stop the home's server (SIGTERM, then SIGKILL after 30 s); the one stopped, or None if none ran."""
    with _locked(home):
        server = _read_state(home)
        if server is None:
            return None
        running = _healthy(server, home)
        _discard_stale(home)
        return server if running else None


def _discard_stale(home: Path) -> None:
    """Terminate the recorded process if it is still ours, and forget it."""
    server = _read_state(home)
    if server is not None and _is_our_process(server, home):
        _terminate(server.pid)
    (home / STATE_FILE).unlink(missing_ok=True)


def _terminate(pid: int, grace_s: float = 30.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)  # started in its own session: its group is its pid
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        # our own child (started by this process, e.g. in a test) is a zombie until reaped: reap it
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(prefect_home: Path) -> dict[str, str]:
    """The user's environment without its Prefect settings (they may point at another server or database),
    with this home's Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_LOGGING_LEVEL="WARNING", PREFECT_LOGGING_LEVEL="WARNING")
    return env


def _start(home: Path, attempts: int = 3) -> Server:
    """Start ``prefect server start`` in its own session (it outlives this process and ignores its Ctrl-C)."""
    prefect_home = _prefect_home(home)
    prefect_home.mkdir(parents=True, exist_ok=True)
    log = prefect_home / LOG_FILE
    for _ in range(attempts):  # the free port may be taken before the server binds it: try another
        port = _free_port()
        with open(log, "ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)], env=_server_env(prefect_home), cwd=prefect_home,
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = Server(pid=proc.pid, port=port, api_url=f"http://127.0.0.1:{port}/api",
                        prefect_home=str(prefect_home), started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _api_prefect_home(server.api_url) == server.prefect_home:
                _write_state(home, server)
                return server
            time.sleep(0.25)
        if proc.poll() is None:  # up but not answering in time: give up on it
            _terminate(proc.pid)
            raise ServerError(f"the Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s (log: {log})")
    raise ServerError(f"the Prefect server exited at start-up {attempts} times (log: {log})")


def alive(server: Server) -> bool:
    """Whether the server's process still runs (cheap: no request)."""
    return _alive(server.pid)


def watch(server: Server, on_exit: Callable[[], None], interval_s: float = 0.5) -> Callable[[], None]:
    """Call ``on_exit`` once, from a daemon thread, if the server's process ends (``kill -9``, the OOM killer)
    while a run uses it; returns the function that stops watching."""
    import threading

    stopped = threading.Event()

    def loop() -> None:
        while not stopped.wait(interval_s):
            if not _alive(server.pid):
                on_exit()
                return

    threading.Thread(target=loop, name="atelier-prefect-server-watch", daemon=True).start()
    return stopped.set
