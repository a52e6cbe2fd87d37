"""Helpers for the benchmarks: timing, peak memory, result files."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    import os

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def write(name: str, data: dict, table: list[tuple]) -> str:
    """Write ``results/<name>.json`` and ``results/<name>.md``; return the markdown table."""
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    header, *rows = table
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    (RESULTS / f"{name}.md").write_text(md)
    return md
