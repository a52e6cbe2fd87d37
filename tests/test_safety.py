"""The safety gate (open_nsfw on onnxruntime) on real, benign photographs.

No explicit material anywhere: the mechanics are tested with thresholds set around the measured scores of
public sample photographs (scikit-image's astronaut 0.032, coffee 0.013, chelsea 0.00015, rocket 0.00046), so
the astronaut stands in for "an image at or above the threshold".
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from atelier import safety
from atelier.profiles import SAFETY_MODEL
from tests.conftest import tiny_home, with_refs, write_brief

THRESHOLD = 0.02  # between the astronaut (0.032) and the coffee (0.013): the astronaut is "flagged"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        out[name] = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(out[name])
    return out


def test_open_nsfw_scores_real_benign_photos_low(models, photos) -> None:
    clf = models.safety_classifier(SAFETY_MODEL)
    assert models.safety_classifier(SAFETY_MODEL) is clf  # loaded once per process
    scores = dict(zip(photos, safety.score(clf, [Image.open(p) for p in photos.values()])))
    assert all(s < 0.2 for s in scores.values()), scores  # Yahoo: < 0.2 is safe
    # measured: astronaut 0.0318, coffee 0.0131, chelsea 0.00015, rocket 0.00046 (deterministic; ±30% margins)
    assert 0.022 < scores["astronaut"] < 0.045 and 0.009 < scores["coffee"] < 0.018
    assert scores["chelsea"] < 0.002 and scores["rocket"] < 0.002


def test_decisions_around_a_threshold() -> None:
    assert safety.decide(0.032, THRESHOLD, "block") == "block"
    assert safety.decide(0.032, THRESHOLD, "flag") == "flag"
    assert safety.decide(0.032, THRESHOLD, "off") == "pass"
    assert safety.decide(0.013, THRESHOLD, "block") == "pass"
    assert safety.flagged(0.032, THRESHOLD, "flag") and safety.flagged(0.032, THRESHOLD, "block")
    assert not safety.flagged(0.032, THRESHOLD, "off") and not safety.flagged(0.013, THRESHOLD, "block")
    with pytest.raises(ValueError, match="known: block, flag, off"):
        safety.decide(0.5, 0.5, "warn")


BRIEF = """\
campaign: gate
profile: tiny
brand:
  style_refs: [refs/*.jpg]
safety: {SAFETY}
deliverables:
  - name: hero
    prompt: "a photograph"
    drafts: 4
    keep: 2
"""


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _gate_run(tmp_path: Path, models_dir: Path, photos: dict, safety_yaml: str, run_id: str):
    """A run of a brief whose 'drafts' are the four photographs (stored as draft assets), through the real
    select and export tasks (their plain functions: no Prefect server)."""
    from atelier.brief import load_brief
    from atelier.keys import asset_key
    from flows.context import RunContext, RunSpec
    from flows.executor import refs
    from store import NewAsset, lineage, save

    folder = with_refs(tmp_path / "brief")
    campaign = load_brief(write_brief(folder, BRIEF.replace("{SAFETY}", safety_yaml)))
    home = tmp_path / "home" if (tmp_path / "home").exists() else tiny_home(tmp_path / "home", models_dir)
    ctx = RunContext(RunSpec(run_id=run_id, home=str(home), profile="tiny", brief_root=str(folder)))
    lineage.start_run(ctx.store, run_id, "gate", str(campaign.path), campaign.sha256, "tiny", {})
    assets = [NewAsset(key=asset_key("draft", 1, {"photo": n}, [], None), stage="draft", kind="image", campaign="gate",
                       deliverable="hero", data=_png(p), suffix=".png", params={"photo": n, "index": i, "seed": i},
                       width=Image.open(p).width, height=Image.open(p).height)
              for i, (n, p) in enumerate(photos.items())]
    save(ctx.store, run_id, assets)
    drafts = refs(ctx.store, [a.key for a in assets])
    return ctx, campaign, dict(zip(photos, drafts))


def test_the_gate_keeps_flagged_drafts_out_and_blocked_finals_undelivered(tmp_path, models_dir, photos,
                                                                         monkeypatch) -> None:
    import typer

    from atelier.cli.run import SAFETY_EXIT, _exit_if_blocked
    from atelier.contact_sheet import render_html, sheet_data
    from atelier.review import run_row
    from flows.tasks import export_task, moodboard_task, select_task
    from store import lineage

    monkeypatch.setenv("ATELIER_C2PA", "off")
    ctx, campaign, drafts = _gate_run(tmp_path, models_dir, photos, f"{{mode: block, threshold: {THRESHOLD}}}", "r1")
    # 1. Drafts: the astronaut (0.032 >= 0.02) is never selected, whatever CLIP thinks of it
    board = moodboard_task.fn(ctx, campaign)
    kept = select_task.fn(ctx, campaign, "hero", 0, list(drafts.values()), board)
    kept_bytes = {Path(k.path).read_bytes() for k in kept}
    assert len(kept) == 2 and Path(drafts["astronaut"].path).read_bytes() not in kept_bytes
    info = run_row(ctx.store, "r1").info["safety"]["hero"]
    assert info[drafts["astronaut"].key]["decision"] == "excluded" and info[drafts["coffee"].key]["decision"] == "pass"
    assert 0.022 < info[drafts["astronaut"].key]["nsfw"] < 0.045
    with ctx.store.sessions() as s:  # the contact sheet shows each draft's score, and the exclusion
        page = render_html(sheet_data(s, run_row(ctx.store, "r1")), ctx.store.files.path)
    assert page.count("data-decision='excluded'") == 1 and "nsfw 0.032" in page and "nsfw 0.013" in page
    # 2. Finals: the astronaut is blocked (not exported, and the run says which and why), the coffee delivered;
    # what an earlier run delivered at the blocked final's place is withdrawn, not left to pass for this run's
    earlier = ctx.home / "outputs" / "gate" / "hero-1.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(Path(drafts["coffee"].path).read_bytes())
    earlier.with_name("hero-1.png.json").write_text("{}")
    paths = export_task.fn(ctx, campaign, "hero", [drafts["astronaut"], drafts["coffee"]])
    assert [Path(p).name for p in paths] == ["hero-2.png"]
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["hero-2.png", "hero-2.png.json"]
    lineage.finish_run(ctx.store, "r1")
    [blocked] = lineage.safety_blocked(run_row(ctx.store, "r1"))
    assert blocked["key"] == drafts["astronaut"].key and blocked["decision"] == "block"
    assert blocked["threshold"] == THRESHOLD and blocked["nsfw"] >= THRESHOLD
    with pytest.raises(typer.Exit) as exit_info:
        _exit_if_blocked(ctx.store, "r1")
    assert exit_info.value.exit_code == SAFETY_EXIT
    # 3. The contact sheet says which final was blocked and why
    with ctx.store.sessions() as s:
        page = render_html(sheet_data(s, run_row(ctx.store, "r1")), ctx.store.files.path)
    assert "Blocked by the safety gate" in page and f"<code>{drafts['astronaut'].key}</code> not exported" in page
    # 4. The scores are check assets: a second gate over the same images computes nothing
    with ctx.store.sessions() as s:
        from sqlalchemy import func, select

        from store.schema import Asset

        checks = s.scalar(select(func.count()).select_from(Asset).where(Asset.stage == "safety"))
    assert checks == 4

    # flag: the astronaut final is delivered, and marked
    ctx2, campaign2, drafts2 = _gate_run(tmp_path / "flag", models_dir, photos, f"{{mode: flag, threshold: {THRESHOLD}}}",
                                         "r2")
    paths = export_task.fn(ctx2, campaign2, "hero", [drafts2["astronaut"], drafts2["coffee"]])
    assert [Path(p).name for p in paths] == ["hero-1.png", "hero-2.png"]
    assert run_row(ctx2.store, "r2").info["safety"]["hero"][drafts2["astronaut"].key]["decision"] == "flag"
    _exit_if_blocked(ctx2.store, "r2")  # nothing blocked: no exit
