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
# `atelier run` in a test (and in the processes tests start) keeps Prefect's temporary server, as before
# `atelier server`: no test leaves a lasting server behind. tests/test_server.py removes it to test that server.
os.environ.setdefault("ATELIER_EPHEMERAL", "1")

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


def with_refs(folder: Path, names: tuple[str, ...] = ("coffee.jpg", "chelsea.jpg")) -> Path:
    """``folder`` with ``refs/`` holding the named demo reference photographs; returns ``folder``."""
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DEMO_REFS / name, folder / "refs" / name)
    return folder


@pytest.fixture
def brief_dir(tmp_path) -> Path:
    """A folder with two reference images (real photographs) for briefs written by tests."""
    return with_refs(tmp_path)


def write_brief(folder: Path, text: str, name: str = "brief.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tiny_home(home: Path, models_dir: Path) -> Path:
    """``home`` (created) with the session's tiny models linked in as its ``models`` folder (built once)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


TINY_BRIEF = """\
campaign: views
profile: tiny
seed: 5
brand:
  style_refs: [refs/*.jpg]
  negative: "watermark"
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "16:9"
    drafts: 4
    keep: 2
    size: 192x108
    post:
      inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}
      upscale: true
  - name: poster
    prompt: "a cup of coffee, morning light"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 128x128
    post:
      face_restore: true
      upscale: true
  - name: tile
    prompt: "a cup of coffee"
    aspect: "1:1"
    drafts: 3
    keep: 1
    size: 128x128
"""


@pytest.fixture(scope="session")
def tiny_run(prefect_server, models_dir, tmp_path_factory) -> dict:
    """One run of ``TINY_BRIEF`` through the CLI, shared by the modules that read a finished run (lineage views,
    metadata): three deliverables covering every stage. Read it, never change it: a test that runs again
    works on a copy of the home (``copy_home``)."""
    from sqlalchemy import select
    from typer.testing import CliRunner

    from atelier.cli import app
    from store import open_store
    from store.schema import Run

    folder = with_refs(tmp_path_factory.mktemp("brief"), ("coffee.jpg", "chelsea.jpg", "astronaut.jpg"))
    home = tiny_home(tmp_path_factory.mktemp("home"), models_dir)
    res = CliRunner().invoke(app, ["run", str(write_brief(folder, TINY_BRIEF)), "--home", str(home), "--no-report"])
    assert res.exit_code == 0, res.output
    with open_store(home).sessions() as s:
        run_id = s.scalars(select(Run.id)).one()
    return {"home": home, "run_id": run_id, "brief": folder / "brief.yaml"}


def copy_home(home: Path, target: Path) -> Path:
    """A copy of a finished run's home (its models folder stays a link) for a test that changes the store."""
    shutil.copytree(home, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through chromedriver, one per test module. Missing = a failure (`make test-deps`)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium / chromedriver not installed: run `make test-deps` (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    yield drv
    drv.quit()


@pytest.fixture(scope="session")
def astronaut_path(tmp_path_factory) -> Path:
    """scikit-image's astronaut photograph (public domain): one real face."""
    from PIL import Image
    from skimage import data

    p = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(p)
    return p


from tests.postgres import postgres_server, postgres_url  # noqa: E402,F401  (a real PostgreSQL server)
