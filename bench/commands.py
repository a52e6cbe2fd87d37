"""How long the everyday commands take, each in its own process, side by side with ``python -c pass`` (issue 13).

    python -m bench.commands [--home DIR] [--rounds 7] [--keep-server]

The home (default: a folder under the system temp dir, kept between invocations) gets one cold run of the demo
brief first (not timed) and the home's Prefect server (`atelier server start`; stopped at the end when this
script started it, unless --keep-server). Then every command runs once unmeasured (page cache, .pyc written
under a pycache folder of the bench's own), and ``--rounds`` times round-robin with the reference, so a busy
neighbour slows all of them alike. Per command:
median wall seconds, median CPU seconds (user + sys of the process: what load changes least), and the ratio of
the median wall to the reference's. The re-run is measured twice: through the Prefect flow (``ATELIER_FAST_RERUN=0``)
and as a person gets it (``atelier.fastpath``: no Prefect import), and checked to make no model call and to take
the fast path. Writes
``results/commands.json`` and ``results/commands.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write

REPO = Path(__file__).resolve().parent.parent
DEMO = "campaigns/demo.yaml"


PYCACHE = Path(tempfile.gettempdir()) / "atelier-bench-pycache"


def _env() -> dict:
    """No Prefect server configured: `atelier run` uses the home's own (what a person gets). Bytecode is
    cached (an installed atelier has its .pyc; PYTHONDONTWRITEBYTECODE would recompile atelier's ~30 modules in
    every process, ~0.2 s), under a folder of its own so the work tree gets no __pycache__."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "ATELIER_EPHEMERAL", "PYTHONDONTWRITEBYTECODE")}
    return {**env, "PYTHONPYCACHEPREFIX": str(PYCACHE)}


def _timed(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, cpu, res


def _atelier(*args: str) -> list[str]:
    return [sys.executable, "-m", "atelier", *args]


def commands(home: Path) -> list[tuple[str, list[str], float | None]]:
    """(label, argv, target seconds or None) for each command measured, the reference first."""
    h = ["--home", str(home)]
    final = sorted((home / "outputs").glob("*/*.png"))[0]
    return [
        ("python -c pass", [sys.executable, "-c", "pass"], None),
        ("atelier --help", _atelier("--help"), None),
        ("atelier validate demo.yaml", _atelier("validate", DEMO), 1.0),
        ("atelier runs", _atelier("runs", *h), 1.0),
        ("atelier report", _atelier("report", *h), 1.0),
        ("atelier assets", _atelier("assets", *h), 1.0),
        ("atelier lineage FINAL.png", _atelier("lineage", str(final), *h), 1.0),
        ("atelier models", _atelier("models", *h), 2.0),
        ("atelier server status", _atelier("server", "status", *h), None),
        # the same re-run through the Prefect flow (the fast path off), then as a person gets it (atelier.fastpath)
        ("atelier run demo.yaml (unchanged, through the flow)",
         ["env", "ATELIER_FAST_RERUN=0", *_atelier("run", DEMO, *h, "--no-report")], None),
        ("atelier run demo.yaml (unchanged, server up)", _atelier("run", DEMO, *h, "--no-report"), 3.0),
    ]


def _latest_run_info(home: Path) -> dict:
    """The ``info`` of the home's latest run (did the re-run take the fast path?)."""
    from store import open_store, queries

    with open_store(home).sessions() as s:
        return dict(queries.latest_run(s).info or {})


def _model_calls_of_latest_run(home: Path) -> int:
    _, _, res = _timed(_atelier("runs", "--home", str(home), "--json"))
    latest = json.loads(res.stdout)[0]["id"]
    _, _, res = _timed(_atelier("report", latest, "--home", str(home), "--json"))
    return sum(s.get("computed", 0) for s in json.loads(res.stdout)["stages"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "atelier-bench-commands")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--keep-server", action="store_true", help="leave the home's Prefect server running")
    args = ap.parse_args()
    home = args.home.resolve()

    # 1. A home with a finished demo run, and its server up
    if not list((home / "outputs").glob("*/*.png")):
        print(f"cold run of {DEMO} in {home} (not timed)…", flush=True)
        _timed(_atelier("run", DEMO, "--home", str(home), "--no-report"))
    _, _, res = _timed(_atelier("server", "start", "--home", str(home), "--json"))
    started_server = json.loads(res.stdout)["started"]

    # 2. One unmeasured pass, then rounds round-robin with the reference
    cmds = commands(home)
    for _, argv, _ in cmds:
        _timed(argv)
    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {label: [] for label, _, _ in cmds}
    cpus: dict[str, list[float]] = {label: [] for label, _, _ in cmds}
    for r in range(args.rounds):
        for label, argv, _ in cmds:
            wall, cpu, _ = _timed(argv)
            walls[label].append(wall)
            cpus[label].append(cpu)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    load_after = os.getloadavg()
    fast_path = bool(_latest_run_info(home).get("fast_path"))
    model_calls = _model_calls_of_latest_run(home)
    if started_server and not args.keep_server:
        _timed(_atelier("server", "stop", "--home", str(home)))

    # 3. Medians and ratios
    ref = statistics.median(walls["python -c pass"])
    rows, results = [("command", "target", "median wall s", "median CPU s", "x python -c pass", "met")], []
    for label, argv, target in cmds:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        met = "" if target is None else ("yes" if wall <= target else "no")
        rows.append((label, f"<= {target:g} s" if target else "", f"{wall:.2f}", f"{cpu:.2f}", f"{wall / ref:.0f}",
                     met))
        results.append({"command": label, "argv": argv[1:], "target_s": target, "median_wall_s": wall,
                        "median_cpu_s": cpu, "ratio_to_reference": wall / ref, "walls_s": walls[label],
                        "cpus_s": cpus[label]})
    md = write("commands", {"rounds": args.rounds, "home": str(home), "reference_s": ref,
                            "loadavg_before": load_before, "loadavg_after": load_after,
                            "rerun_model_calls": model_calls, "rerun_fast_path": fast_path, "commands": results}, rows)
    print(md)
    print(f"load average {load_before[0]:.1f} → {load_after[0]:.1f} on {os.cpu_count()} CPUs; "
          f"unchanged re-run computed {model_calls} assets (goal 0), fast path {'taken' if fast_path else 'NOT taken'}")


if __name__ == "__main__":
    main()
