"""One ``atelier run`` in this process, then a JSON line with what the wall clock cannot tell from outside:
the model calls the run made (count, seconds inside them) and the whole command's wall time.

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
    from flows.campaign import PHASES
    from flows.tasks import MODEL_CALLS

    try:
        app(["run", brief, "--home", home, "--no-report", *extra], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    print(json.dumps({"cli_wall_s": time.perf_counter() - t0, "model_calls": MODEL_CALLS.count,
                      "model_s": MODEL_CALLS.seconds, "by_stage": dict(MODEL_CALLS.by_stage),
                      "export_s": PHASES["export"], "artifacts_s": PHASES["artifacts"]}))


if __name__ == "__main__":
    main()
