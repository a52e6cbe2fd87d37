"""Where a run's wall time goes: sample ``atelier run`` with py-spy and sum the main thread's time per phase.

    python -m bench.profile_run campaigns/tiny-demo.yaml HOME [--rate 100] [atelier run options...]

Samples every thread with idle time included (a wait on the Prefect server counts), keeps the main thread
under ``campaign_flow`` and attributes each sample to the first matching phase below (stage functions
first). ``pip install py-spy`` (the ``bench`` extra); the raw stacks stay in ``HOME/profile.txt`` for a
flame graph.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

STAGE_FUNCTIONS = re.compile(r"^(generate_drafts|refine|inpaint|upscale|restore_faces|build_moodboard|select_drafts) "
                             r"\(stages/")
PHASES = [  # (label, substrings of a frame, any of which puts a sample in the phase)
    ("Prefect slot request for a tagged task", ("acquire_concurrency_slots",)),
    ("artifacts + HTML contact sheet", ("publish_deliverable (",)),
    ("export: C2PA signing, sidecars", ("export_task (",)),
    ("PNG encoding", ("png_bytes (",)),
    ("lineage document in the PNG", ("_image_asset (",)),
    ("store.save (files + rows)", ("save (store/",)),
    ("stage rows, reuse marks", ("record_stage (", "mark_reused (", "_finish_reused (")),
    ("reuse checks (keys in store, files present)", ("_refs (", "_missing (", "_to_compute (")),
    ("model identity (weights hash)", ("identity (atelier/sources", "identity (atelier/models")),
    ("seed lookups", ("_seed_of (",)),
    ("Prefect task engine", ("Task.__call__ (",)),
    ("Prefect subflow engine", ("Flow.__call__ (",)),
]


def summarize(raw: Path, rate: int) -> list[tuple[str, float]]:
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        try:
            i = next(i for i, f in enumerate(frames) if f.startswith("campaign_flow ("))
        except StopIteration:
            continue
        rest = frames[i + 1:]
        totals["(flow total)"] += int(n)
        if any(STAGE_FUNCTIONS.match(f) for f in rest):
            totals["inside model calls (stage functions)"] += int(n)
            continue
        joined = ";".join(rest)
        label = next((lab for lab, subs in PHASES if any(s in joined for s in subs)), "other flow code")
        totals[label] += int(n)
    return [(k, v / rate) for k, v in totals.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("brief")
    ap.add_argument("home")
    ap.add_argument("--rate", type=int, default=100)
    args, extra = ap.parse_known_args()
    raw = Path(args.home) / "profile.txt"
    Path(args.home).mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run([py_spy, "record", "--idle", "--threads", "--rate", str(args.rate), "--format", "raw", "-o",
                    str(raw), "--", sys.executable, "-m", "bench.run_once", args.brief, args.home, *extra], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    for label, seconds in summarize(raw, args.rate):
        print(f"{seconds:8.2f} s  {label}")


if __name__ == "__main__":
    main()
