"""End to end on the production layout: lineage in PostgreSQL (a real server), asset files in an fsspec
location outside the home (the local filesystem standing in for an object store)."""

from __future__ import annotations

import hashlib
import json
import time

import fsspec
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Asset, RunAsset
from tests.conftest import with_refs, write_brief

pytestmark = pytest.mark.slow  # whole campaigns through Prefect (make test-fast skips them)

BRIEF = """\
campaign: pg
profile: tiny
seed: 3
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 2
    keep: 1
    size: 128x128
    post:
      upscale: true
"""


@pytest.fixture(scope="module")
def pg_run(prefect_server, postgres_server, tmp_path_factory):

    folder = with_refs(tmp_path_factory.mktemp("brief"))
    brief = write_brief(folder, BRIEF)
    home, bucket = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("bucket")
    where = ["--home", str(home), "--store", postgres_server.create_database(), "--assets", f"file://{bucket}/assets"]
    runner = CliRunner()
    seconds = []
    for _ in range(2):  # cold, then unchanged
        t0 = time.monotonic()
        res = runner.invoke(app, ["run", str(brief), *where, "--no-report"])
        assert res.exit_code == 0, res.output
        seconds.append(time.monotonic() - t0)
    print(f"\npostgres + fsspec run: cold {seconds[0]:.1f}s, unchanged {seconds[1]:.1f}s")
    runs = json.loads(runner.invoke(app, ["runs", *where[:4], "--json"]).output)
    return {"where": where, "home": home, "bucket": bucket, "runs": [r["id"] for r in reversed(runs)],
            "runner": runner}


def test_lineage_in_postgres_files_in_the_object_store(pg_run) -> None:
    _, _, _, url, _, assets = pg_run["where"]
    home = pg_run["home"]
    store = open_store(home, url, assets)
    assert store.dialect == "postgresql"
    fs, root = fsspec.core.url_to_fs(assets)
    with store.sessions() as s:
        rows = s.execute(select(RunAsset, Asset).join(Asset, Asset.key == RunAsset.asset_key)
                         .where(RunAsset.run_id == pg_run["runs"][0])).all()
        assert {a.stage for _, a in rows} == {"reference", "moodboard", "draft", "select", "refine", "upscale", "safety"}
        for _, a in rows:  # every file at the URL with its recorded bytes
            assert hashlib.sha256(fs.cat_file(f"{root}/{a.path.removeprefix('assets/')}")).hexdigest() == a.sha256
        finals = [a for ra, a in rows if ra.final]
        assert [(a.width, a.height) for a in finals] == [(128, 128)]
    assert not (home / "assets").exists()  # the home only caches what stages read
    assert (home / "outputs" / "pg" / "hero-1.png").is_file()


def test_unchanged_rerun_reuses_everything_from_postgres(pg_run) -> None:
    res = pg_run["runner"].invoke(app, ["report", pg_run["runs"][1], *pg_run["where"][:4], "--json"])
    data = json.loads(res.output)
    assert data["run"]["status"] == "completed"
    assert all(v["computed"] == 0 and v["reused"] > 0 for v in data["stages"].values()), data["stages"]


def test_doctor_on_postgres_and_the_object_store(pg_run) -> None:
    res = pg_run["runner"].invoke(app, ["doctor", *pg_run["where"], "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 0 and data["healthy"], data
    assert data["counts"]["assets"] == data["counts"]["files"] + 1  # the selected draft shares its draft's file
