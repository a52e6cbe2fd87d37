"""The combined table of the latest results (``results/*.json``): each figure against its goal.

Writes ``results/summary.json`` and ``results/summary.md`` and prints the table.
Usage: python -m bench.summary
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from bench.common import RESULTS, write


def _load(name: str) -> dict | None:
    f = RESULTS / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _row(measure: str, value: float | None, fmt: str, goal: str, ok: bool | None) -> tuple:
    shown = "not run" if value is None else format(value, fmt)
    return (measure, shown, goal, "" if ok is None or value is None else ("met" if ok else "missed"))


def main() -> None:
    rows: list[tuple] = [("#", "measure", "value", "goal (CPU, tiny models)", "")]
    d, c, u = _load("draft_efficiency"), _load("campaign_overhead"), _load("upscale")
    ratio = d and d["ratio"]
    rows.append(("1",) + _row("draft images/s, atelier stage / bare diffusers (interleaved)", ratio, ".3f", ">= 0.85",
                              ratio and ratio >= 0.85))
    r = d and d.get("ratio_with_store")
    rows.append(("1",) + _row("  same, atelier including PNG encode + lineage write", r, ".3f", "", None))
    ov = c and c["cold"]["overhead"]
    rows.append(("2",) + _row("orchestration overhead of the demo campaign, cold", ov, ".1%", "<= 20%",
                              ov is not None and ov <= 0.20))
    st = c and c["cold"]["startup_s"]
    rows.append(("2",) + _row("  start-up apart: imports + Prefect server (s)", st, ".1f", "reported apart", None))
    calls = c and c["rerun"].get("model_calls")
    rows.append(("3",) + _row("unchanged re-run: model calls", calls, "d", "0", calls == 0))
    rr = c and c["rerun_ratio"]
    rows.append(("3",) + _row("unchanged re-run: wall / cold wall", rr, ".1%", "<= 2%", rr is not None and rr <= 0.02))
    own = c and "export_s" in c["rerun"] and ((c["rerun"]["run_wall_s"] - c["rerun"]["export_s"] - c["rerun"]["artifacts_s"])
                                             / c["cold"]["run_wall_s"])
    rows.append(("3",) + _row("  same without export (C2PA) and artifacts (contact sheet)", own or None, ".1%", "", None))
    b = d and d["batching_images_per_s"]  # JSON keys: "1", "8"
    bb = b and b["8"] / b["1"]
    rows.append(("4",) + _row("draft images/s, batch 8 / batch 1", bb, ".2f", ">= 1.4 on GPU (none here)", None))
    for run in (u or {}).get("runs", []):
        rows.append(("5", f"upscale 1024x576 -> 3840x2160, {run['model']}, tile {run['tile']}: s / peak RSS MiB",
                     f"{run['seconds']:.1f} / {run['peak_rss_mib']:.0f}", "", ""))
    if not u:
        rows.append(("5", "upscale", "not run", "", ""))
    rows.append(("6", "on a lent GPU", "not run: no GPU lent to this task", "", ""))
    machine = next((x["machine"] for x in (d, c, u) if x), {})
    print(write("summary", {"written": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows[1:],
                            "machine_of_results": machine}, rows))
    print("machine:", ", ".join(f"{k} {v}" for k, v in machine.items()))


if __name__ == "__main__":
    main()
