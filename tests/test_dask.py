"""Scale-out: a small campaign on a local Dask cluster (prefect-dask), each task in a worker process."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import open_store
from store.schema import Run, RunAsset
from tests.conftest import write_brief

pytestmark = pytest.mark.slow  # whole campaigns through Prefect (make test-fast skips them)

BRIEF = """\
campaign: dask
profile: tiny
seed: 11
brand:
  style_refs: [refs/*.jpg]
deliverables:
  - name: one
    prompt: "a lighthouse at dusk"
    drafts: 2
    keep: 1
    size: 128x128
  - name: two
    prompt: "a bowl of lemons"
    aspect: "4:5"
    drafts: 2
    keep: 1
    size: 128x160
"""


def test_a_campaign_runs_on_a_local_dask_cluster(prefect_server, brief_dir, tmp_path) -> None:
    brief = write_brief(brief_dir, BRIEF)
    home = tmp_path / "home"
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(brief), "--home", str(home), "--task-runner", "dask", "--workers", "2",
                              "--no-report"])
    assert res.exit_code == 0, res.output
    data = json.loads(runner.invoke(app, ["report", "--home", str(home), "--json"]).output)
    assert data["run"]["status"] == "completed"
    from atelier.brief import fit_to_area
    from atelier.profiles import get_profile

    refine = get_profile("tiny").refine
    for name, aspect in (("one", 1.0), ("two", 4 / 5)):
        size = list(fit_to_area(aspect, refine.pixels, refine.multiple))
        d = data["deliverables"][name]
        stages = d["stages"]
        assert stages["draft"]["computed"] == 2 and stages["select"]["computed"] == 1
        assert stages["refine"]["computed"] == 1
        # no upscale in this brief: delivered at the refine resolution, in the deliverable's aspect
        assert [[f["width"], f["height"]] for f in d["finals"]] == [size]
    with open_store(home).sessions() as s:
        finals = s.scalars(select(RunAsset).where(RunAsset.run_id == data["run"]["id"], RunAsset.final)).all()
        info = s.get(Run, data["run"]["id"]).info
        assert info["task_runner"] == "dask"
        assert info["model_calls"]["count"] == 0  # every model call happened in a Dask worker process, none here
    assert sorted(f.export_path.rsplit("/", 1)[1] for f in finals) == ["one-1.png", "two-1.png"]
