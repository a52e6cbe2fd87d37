"""Where things live, and the environment prepared before Prefect / Hugging Face are imported."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".atelier"


def home_dir(option: str | Path | None = None) -> Path:
    """``--home`` beats ``ATELIER_HOME`` beats ``./.atelier``."""
    return Path(option or os.environ.get("ATELIER_HOME") or DEFAULT_HOME).expanduser().resolve()


def prepare_environment(home: Path, offline_models: bool = True) -> None:
    """Set defaults (never overriding the user's) before prefect / huggingface_hub are imported.

    - Prefect keeps its embedded server's database under the atelier home unless PREFECT_HOME or
      PREFECT_API_URL say otherwise; its 20 s start-up timeout is too short for slow CI machines.
    - No machine here reaches a model hub: HF offline mode makes a missing model fail in
      milliseconds instead of retrying for ~40 s.
    """
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))  # created by the run, not here: nothing is written
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline_models:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
