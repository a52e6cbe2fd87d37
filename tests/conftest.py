"""Shared fixtures: tiny random-weight models built once per session, one Prefect test server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from atelier import compat  # noqa: E402

compat.apply()

REPO = Path(__file__).resolve().parent.parent
DEMO_REFS = REPO / "campaigns" / "demo" / "moodboard"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Tiny models, built once per test session under a temp home."""
    from atelier import tiny

    d = tmp_path_factory.mktemp("home") / "models"
    for name in tiny.BUILDERS:
        tiny.ensure(name, d)
    return d


@pytest.fixture(scope="session")
def models(models_dir):
    """The process's model cache over the session's tiny models (what stage functions take)."""
    from atelier.models import Models

    return Models.at(models_dir)


@pytest.fixture(scope="session")
def tiny_profile():
    from atelier.profiles import get_profile

    return get_profile("tiny")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one costs ~10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def brief_dir(tmp_path) -> Path:
    """A folder with two reference images (real photographs) for briefs written by tests."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg"):
        shutil.copy(DEMO_REFS / name, refs / name)
    return tmp_path


def write_brief(folder: Path, text: str, name: str = "brief.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def astronaut_path(tmp_path_factory) -> Path:
    """scikit-image's astronaut photograph (public domain): one real face."""
    from PIL import Image
    from skimage import data

    p = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(p)
    return p


from tests.postgres import postgres_server, postgres_url  # noqa: E402,F401  (a real PostgreSQL server)
