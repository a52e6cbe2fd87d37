"""2 + 3. Orchestration overhead of a whole campaign, and the cost of re-running an unchanged brief.

Runs ``atelier run BRIEF`` twice in a fresh home (cold, then unchanged) as subprocesses and reads the
lineage store:
- run wall time = the flow's own start→finish (excludes interpreter start-up and Prefect's server start);
- stage time = sum of ``seconds`` of the assets the run computed (time inside the stage functions:
  model calls plus their image I/O);
- overhead = (run wall − stage time) / run wall;
- start-up = CLI wall − run wall (imports + Prefect's embedded server start), reported separately.
Usage: python bench/campaign_overhead.py [--brief campaigns/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write

REPO = Path(__file__).resolve().parent.parent


def _run(brief: str, home: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "atelier", "run", brief, "--home", str(home), "--no-report"],
                   check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t0


def _measure(home: Path, run_id: str) -> dict:
    from store import open_store, queries
    from store.schema import Run

    st = open_store(home)
    with st.sessions() as s:
        run = s.get(Run, run_id)
        members = queries.run_assets(s, run_id)
        wall = (run.finished_at - run.started_at).total_seconds()
        stage = sum(a.seconds for ra, a in members if ra.status == "computed")
        computed = sum(1 for ra, _ in members if ra.status == "computed")
    return {"run_wall_s": wall, "stage_s": stage, "overhead": (wall - stage) / wall if wall else 0.0,
            "computed": computed, "assets": len(members)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brief", default="campaigns/demo.yaml")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    _run(args.brief, home / "warm")  # builds the tiny models and Prefect's database once, outside the timing
    (home / "h").mkdir()
    shutil.copytree(home / "warm" / "models", home / "h" / "models")  # a home with its models already built
    cold_cli = _run(args.brief, home / "h")
    rerun_cli = _run(args.brief, home / "h")
    from store import open_store, queries

    with open_store(home / "h").sessions() as s:
        run_ids = [r.id for r in reversed(queries.runs(s))]
    cold, rerun = _measure(home / "h", run_ids[0]), _measure(home / "h", run_ids[1])
    cold["startup_s"] = cold_cli - cold["run_wall_s"]
    rerun["startup_s"] = rerun_cli - rerun["run_wall_s"]
    ratio = rerun["run_wall_s"] / cold["run_wall_s"]
    table = [("measure", "cold run", "unchanged re-run", "goal"),
             ("run wall (s)", f"{cold['run_wall_s']:.1f}", f"{rerun['run_wall_s']:.1f}", ""),
             ("time inside stages (s)", f"{cold['stage_s']:.1f}", f"{rerun['stage_s']:.1f}", ""),
             ("orchestration overhead", f"{cold['overhead']:.1%}", "", "<= 20% tiny, <= 5% GPU-size"),
             ("assets computed / total", f"{cold['computed']}/{cold['assets']}", f"{rerun['computed']}/{rerun['assets']}",
              "re-run: 0 computed"),
             ("re-run / cold wall", "", f"{ratio:.1%}", "<= 2%"),
             ("start-up: imports + Prefect server (s)", f"{cold['startup_s']:.1f}", f"{rerun['startup_s']:.1f}", "")]
    print(write("campaign_overhead", {"brief": args.brief, "cold": cold, "rerun": rerun, "rerun_ratio": ratio}, table))
    print(json.dumps({"rerun_ratio": ratio, "overhead": cold["overhead"]}))


if __name__ == "__main__":
    main()
