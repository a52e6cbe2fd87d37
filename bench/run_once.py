"""One ``atelier run`` in this process, then a JSON line with what the wall clock cannot tell from outside:
the model calls the run made (count, seconds inside them) and the phases it timed, as the run recorded them
in the store (``runs.info``), and the whole command's wall time.

Usage: python -m bench.run_once BRIEF HOME [atelier run options...]
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    brief, home, *extra = sys.argv[1:]
    t0 = time.perf_counter()
    from atelier.cli import app

    try:
        app(["run", brief, "--home", home, "--no-report", *extra], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - t0
    from pathlib import Path

    from store import open_store, queries

    with open_store(Path(home)).sessions() as s:
        info = queries.runs(s, limit=1)[0].info
    calls, phases = info["model_calls"], info.get("phases", {})
    print(json.dumps({"cli_wall_s": wall, "model_calls": calls["count"], "model_s": calls["seconds"],
                      "by_stage": calls["by_stage"], "export_s": phases.get("export", 0.0),
                      "artifacts_s": phases.get("artifacts", 0.0)}))


if __name__ == "__main__":
    main()
