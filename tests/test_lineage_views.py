"""Lineage you can see and carry: report / lineage / assets / diff, the HTML contact sheet in a real
headless Chromium, and the C2PA credentials of the finals. One small run for the whole module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier import credentials
from atelier.cli import app
from store import open_store
from store.schema import Asset, Edge, RunAsset, Score
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # whole campaigns through Prefect (make test-fast skips them)

@pytest.fixture(scope="module")
def run(tiny_run) -> dict:
    """The session's shared run (``tests.conftest.TINY_BRIEF``: hero, poster, tile), signed with the home's
    local test certificate."""
    return {**tiny_run, "runner": CliRunner()}


def _cli(run, *args: str, columns: int = 80):
    return run["runner"].invoke(app, [*args, "--home", str(run["home"])], env={"COLUMNS": str(columns)})


def _json(run, *args: str):
    res = _cli(run, *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _members(run) -> list[tuple[RunAsset, Asset]]:
    with open_store(run["home"]).sessions() as s:
        return list(s.execute(select(RunAsset, Asset).join(Asset, Asset.key == RunAsset.asset_key)
                              .where(RunAsset.run_id == run["run_id"])).all())


def _finals(run) -> list[tuple[RunAsset, Asset]]:
    return sorted(((ra, a) for ra, a in _members(run) if ra.final), key=lambda m: m[0].export_path)


# ------------------------------------------------------------------------------------------ report
def test_report_is_plain_and_fits_80_columns_when_piped(run) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    proc = subprocess.run([sys.executable, "-m", "atelier", "report", "--home", str(run["home"])], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "\x1b[" not in text  # no colour codes into a pipe
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for expected in ("mood board · 3 refs", "drafts 4", "✓ kept #1", "✓ kept #2", "refine 2", "inpaint 2",
                     "upscale 2", "finals 2", "outputs/views/hero-1.png", "summary", "per stage"):
        assert expected in text, expected
    # each stage line of a deliverable tells its time and its cost
    stage_lines = [line for line in text.splitlines() if " · cost " in line]
    # hero: drafts, selection, refine, inpaint, upscale; poster: the same with face_restore for inpaint; tile: three
    assert len(stage_lines) == 5 + 5 + 3


def test_report_json_has_mood_board_drafts_and_finals_from_the_store(run) -> None:
    data = _json(run, "report", run["run_id"])
    members = _members(run)
    with open_store(run["home"]).sessions() as s:
        refine_keys = [a.key for _, a in members if a.stage == "refine" and a.deliverable == "hero"]
        style = {e.parent for e in s.scalars(select(Edge).where(Edge.child.in_(refine_keys), Edge.role == "style-ref"))}
        kept = {sc.draft_key for sc in s.scalars(select(Score).where(Score.kept.is_(True)))}
    hero = data["deliverables"]["hero"]
    assert {r["key"] for r in hero["moodboard"]} == style and len(style) == 3
    assert {d["key"] for d in hero["draft"] if d["kept"]} == kept & {d["key"] for d in hero["draft"]}
    assert sorted(f["final"] for f in hero["finals"]) == sorted(
        ra.export_path for ra, a in members if ra.final and a.deliverable == "hero")
    # each refined image names the kept draft (through its selection) it came from
    select_from = {x["key"]: x["from"] for x in hero["select"]}
    assert {select_from[x["from"]] for x in hero["refine"]} == {d["key"] for d in hero["draft"] if d["kept"]}


def test_report_bad_inputs_are_one_line_and_exit_2(run, tmp_path) -> None:
    res = _cli(run, "report", "no-such-run")
    assert res.exit_code == 2 and "no run 'no-such-run'" in res.output
    res = _cli(run, "report", "--html", str(tmp_path / "missing" / "x.html"))
    assert res.exit_code == 2 and "--html" in res.output and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------------------- lineage
def _find(node: dict, stage: str) -> dict | None:
    if node["stage"] == stage:
        return node
    return next((hit for p in node["parents"] if (hit := _find(p, stage)) is not None), None)


def test_lineage_shows_what_changed_at_each_step(run) -> None:
    final = Path(_finals(run)[0][0].export_path)
    node = _json(run, "lineage", str(final))
    assert node["from"] == "store" and node["stage"] == "upscale"  # a signed delivery still resolves to its asset
    draft, refine, inpaint = _find(node, "draft"), _find(node, "refine"), _find(node, "inpaint")
    # a root sets everything; later steps show only what they change relative to their source
    assert draft["changed"]["prompt"] == [None, "a red bicycle against a brick wall"]
    assert draft["changed"]["steps"] == [None, draft["params"]["steps"]]
    assert refine["changed"]["steps"] == [draft["params"]["steps"], refine["params"]["steps"]]  # 4 -> 8 on tiny
    assert refine["changed"]["strength"] == [None, refine["params"]["strength"]]
    assert refine["changed"]["size"] == [f"{draft['width']}x{draft['height']}", f"{refine['width']}x{refine['height']}"]
    assert "seed" not in refine["changed"]  # the refine keeps its draft's seed
    assert inpaint["changed"]["prompt"] == ["a red bicycle against a brick wall", "plain wall"]
    assert node["changed"]["size"] == [f"{inpaint['width']}x{inpaint['height']}", "192x108"]
    wide = _cli(run, "lineage", str(final), columns=300).output
    assert f"steps {draft['params']['steps']}→{refine['params']['steps']}" in wide and "→'plain wall'" in wide
    assert wide.count("as above") == 3  # the style references, shown once
    narrow = _cli(run, "lineage", str(final)).output
    assert max(len(line) for line in narrow.splitlines()) <= 80


# ------------------------------------------------------------------------------------ assets, diff
def test_assets_filters_match_the_store(run) -> None:
    members = [a for _, a in _members(run)]
    drafts = [a for a in members if a.stage == "draft" and a.deliverable == "hero"]
    got = _json(run, "assets", "--campaign", "views", "--deliverable", "hero", "--stage", "draft")
    assert sorted(a["key"] for a in got) == sorted(a.key for a in drafts)
    with open_store(run["home"]).sessions() as s:
        kept = set(s.scalars(select(Score.draft_key).where(Score.kept.is_(True))))
    assert {a["key"] for a in _json(run, "assets", "--kept")} == kept and len(kept) == 4
    all_drafts = {a.key for a in members if a.stage == "draft"}
    assert {a["key"] for a in _json(run, "assets", "--not-kept")} == all_drafts - kept
    seed = next(a.params["seed"] for a in drafts if a.key in kept)  # a kept draft: its chain goes on
    by_seed = _json(run, "assets", "--seed", str(seed))
    assert {a["stage"] for a in by_seed} >= {"draft", "refine", "inpaint"}  # one seed per lineage
    assert all(a["params"]["seed"] == seed for a in by_seed)
    upscaler = next(a.model["name"] for a in members if a.stage == "upscale")
    assert {a["key"] for a in _json(run, "assets", "--model", upscaler)} == {a.key for a in members
                                                                           if a.stage == "upscale"}
    assert len(_json(run, "assets", "--since", "1h", "--limit", "500")) == len(members)
    assert _json(run, "assets", "--since", "2999-01-01") == []
    text = _cli(run, "assets", "--stage", "draft").output
    assert "✓" in text and max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since: expected a date"),
    (["--stage", "sketch"], "--stage: unknown stage 'sketch'"),
    (["--stage", "refine", "--kept"], "--kept/--not-kept: only drafts"),
])
def test_assets_bad_filters_are_one_line_and_exit_2(run, args, message) -> None:
    res = _cli(run, "assets", *args, columns=200)
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_diff_shows_what_differs_between_two_recipes(run) -> None:
    drafts = sorted((a for _, a in _members(run) if a.stage == "draft" and a.deliverable == "hero"),
                    key=lambda a: a.params["index"])
    got = _json(run, "diff", drafts[0].key, drafts[1].key)
    assert set(got["differences"]) == {"params.seed", "params.index"}
    assert got["differences"]["params.seed"] == [drafts[0].params["seed"], drafts[1].params["seed"]]
    (hero_ra, hero), tile = _finals(run)[0], next(a for ra, a in _finals(run) if a.deliverable == "tile")
    got = _json(run, "diff", hero_ra.export_path, tile.key[:8])  # a file and a key prefix
    assert got["a"] == hero.key and got["b"] == tile.key
    assert {"deliverable", "stage", "size", "params.height", "parents.source", "parents.init"} <= set(
        got["differences"])
    assert got["differences"]["stage"] == ["upscale", "refine"]  # tile has no post-edit: its final is the refine
    text = _cli(run, "diff", drafts[0].key, drafts[1].key).output
    assert "params.seed" in text and max(len(line) for line in text.splitlines()) <= 80
    res = _cli(run, "diff", drafts[0].key, "nope-nope")
    assert res.exit_code == 2 and "B: nope-nope: no asset" in res.output


# -------------------------------------------------------------------------------- the contact sheet
def test_contact_sheet_in_headless_chromium(run, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    page = tmp_path / "sheet.html"
    res = _cli(run, "report", run["run_id"], "--html", str(page))
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    assert (run["home"] / "reports" / f"{run['run_id']}.html").is_file()  # one per run in the home, too
    members = _members(run)
    drafts = Counter(a.deliverable for _, a in members if a.stage == "draft")
    with open_store(run["home"]).sessions() as s:
        kept = s.scalars(select(Score.draft_key).where(Score.kept.is_(True))).all()
    browser.get(page.as_uri())
    for name in ("hero", "tile"):
        section = browser.find_element(By.ID, f"d-{name}")
        thumbs = section.find_elements(By.CSS_SELECTOR, "figure.draft img")
        assert len(thumbs) == drafts[name]
        assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", t)
                   for t in thumbs)  # the embedded thumbnails decode
        assert len(section.find_elements(By.CSS_SELECTOR, ".moodboard figure.ref img")) == 3
    marks = browser.find_elements(By.CSS_SELECTOR, "figure.draft.kept .kept-mark")
    assert len(marks) == len(kept) and {m.find_element(By.XPATH, "../..").get_attribute("data-key")
                                         for m in marks} == set(kept)
    finals = browser.find_elements(By.CSS_SELECTOR, "details.final")
    assert len(finals) == sum(1 for ra, _ in members if ra.final)
    lineage = finals[0].find_element(By.CSS_SELECTOR, ".lineage")
    assert not lineage.is_displayed()
    finals[0].find_element(By.TAG_NAME, "summary").click()  # clicking a final shows its lineage
    assert lineage.is_displayed() and "draft" in lineage.text and "upscale" in lineage.text
    shot = tmp_path / "contact-sheet.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_contact_sheet_is_a_prefect_artifact(run) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    # The REST API directly: prefect 3.8's client sends nulls for unset filter fields, which its server refuses.
    res = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                     json={"artifacts": {"key": {"any_": ["views-hero-sheet", "views-contact-sheet"]}}})
    res.raise_for_status()
    found = [SimpleNamespace(**a) for a in res.json()]
    by_key = {a.key: a for a in found}
    sheet = by_key["views-hero-sheet"].data
    assert sheet.count("![draft](data:image/jpeg;base64,") == 4 and sheet.count("✓ #") == 2
    assert f"{run['run_id']}.html" in by_key["views-contact-sheet"].data


# ----------------------------------------------------------------------------------------- C2PA
def test_finals_carry_c2pa_credentials_matching_the_lineage(run) -> None:
    from store import queries

    home = run["home"]
    ca = home / "c2pa" / "test-ca.pem"
    st = open_store(home)
    for ra, final in _finals(run):
        delivered = Path(ra.export_path)
        c = credentials.read_credentials(delivered)
        # structurally valid; untrusted (a local test CA is in no trust list) ...
        assert c.validation_state == "Valid"
        assert [e["code"] for e in c.validation_errors] == ["signingCredential.untrusted"]
        # ... and trusted once its CA is a trust anchor: the signature and the chain verify
        trusted = credentials.read_credentials(delivered, trust_anchors=ca)
        assert trusted.validation_state == "Trusted" and trusted.validation_errors == []
        created = [a for a in c.actions() if a["action"] == "c2pa.created"]
        assert created and created[0]["digitalSourceType"] == credentials.TRAINED_ALGORITHMIC_MEDIA
        # ingredients = the draft of its chain + the mood-board references, as the store says
        with st.sessions() as s:
            node, draft, refs = queries.ancestry(s, final.key), None, set()
            stack = [node]
            while stack:
                n = stack.pop()
                refs |= {n["asset"].key} if n["asset"].stage == "reference" else set()
                stack.extend(n["parents"])
            while node is not None:
                draft = node["asset"].key if node["asset"].stage == "draft" else draft
                node = next((p for p in node["parents"] if p["role"] in ("source", "init")), None)
            model = s.get(Asset, draft).model
        assert refs and c.ingredient_keys[0] == draft and set(c.ingredient_keys[1:]) == refs
        assert c.lineage["key"] == final.key
        assert any(m.get("weights_sha256") == model["weights_sha256"] for m in c.lineage["models"])
        # the asset file stays content-addressed: unsigned, its bytes the row's hash
        stored = st.files.path(final.path)
        assert credentials.read_credentials(stored) is None
        from store.files import file_sha256

        assert file_sha256(stored) == final.sha256 != file_sha256(delivered)
    node = _json(run, "lineage", _finals(run)[0][0].export_path)
    assert node["credentials"]["validation_state"] == "Valid" and node["credentials"]["untrusted"]
    assert node["credentials"]["digital_source_type"] == "trainedAlgorithmicMedia"


def test_a_configured_certificate_signs_and_a_half_configuration_is_refused(tmp_path, monkeypatch) -> None:
    from atelier.errors import UsageError

    chain, key, ca = credentials.write_test_certificate(tmp_path / "mine")
    monkeypatch.setenv("ATELIER_C2PA_CERT", str(chain))
    monkeypatch.setenv("ATELIER_C2PA_KEY", str(key))
    cfg = credentials.signing_config(tmp_path / "home")
    assert cfg.cert_chain == chain and not cfg.test_certificate and not (tmp_path / "home" / "c2pa").exists()
    monkeypatch.delenv("ATELIER_C2PA_KEY")
    with pytest.raises(UsageError, match="ATELIER_C2PA_CERT and ATELIER_C2PA_KEY"):
        credentials.signing_config(tmp_path / "home")
    monkeypatch.setenv("ATELIER_C2PA", "off")
    assert credentials.signing_config(tmp_path / "home") is None


def test_an_unchanged_final_is_not_signed_again(tmp_path) -> None:
    """Re-exporting the same final with the same signer leaves the delivered file as it is; a changed
    file, manifest or signer is signed again."""
    import hashlib

    from PIL import Image

    from store.files import file_sha256

    source = tmp_path / "asset.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(source)
    source = source.rename(tmp_path / f"{file_sha256(source)}.png")  # content-addressed, as in assets/
    cfg = credentials.signing_config(tmp_path / "home")
    manifest = credentials.manifest_definition("hero-1.png", "image/png", None, "k" * 32, [])
    target, stamps = tmp_path / "out" / "hero-1.png", tmp_path / "stamps"
    target.parent.mkdir()
    assert credentials.sign_file_once(source, target, cfg, manifest, [], stamps)
    first = target.read_bytes()
    assert credentials.read_credentials(target).validation_state == "Valid"
    assert not credentials.sign_file_once(source, target, cfg, manifest, [], stamps)
    assert target.read_bytes() == first
    # someone edits the delivered file: signed again from the asset
    target.write_bytes(source.read_bytes())
    assert credentials.sign_file_once(source, target, cfg, manifest, [], stamps)
    assert credentials.read_credentials(target) is not None
    # another manifest (another lineage key): signed again
    other = credentials.manifest_definition("hero-1.png", "image/png", None, "j" * 32, [])
    assert credentials.sign_file_once(source, target, cfg, other, [], stamps)
    assert credentials.read_credentials(target).lineage["key"] == "j" * 32
    # another signer: signed again
    chain, key, _ = credentials.write_test_certificate(tmp_path / "mine")
    mine = credentials.SigningConfig(chain, key)
    assert credentials.sign_file_once(source, target, mine, other, [], stamps)
    assert hashlib.sha256(target.read_bytes()).hexdigest() != hashlib.sha256(first).hexdigest()


def test_thumbnails_are_cached_by_content(tmp_path) -> None:
    from PIL import Image

    from atelier.contact_sheet import Thumbnails, thumbnail

    sha = "ab" * 32
    asset = tmp_path / "assets" / sha[:2] / f"{sha}.png"
    asset.parent.mkdir(parents=True)
    Image.new("RGB", (640, 360), (10, 120, 200)).save(asset)
    opened = []

    def path_of(rel: str) -> Path:
        opened.append(rel)
        return tmp_path / rel

    cache = tmp_path / "thumbs"
    uri = Thumbnails(path_of, cache)(f"assets/{sha[:2]}/{sha}.png", 96)
    assert uri == thumbnail(asset, 96) and (cache / f"{sha}-96.jpg").is_file()
    asset.unlink()  # a later process finds the thumbnail without the asset (nor its download)
    opened.clear()
    assert Thumbnails(path_of, cache)(f"assets/{sha[:2]}/{sha}.png", 96) == uri and opened == []
    # a file that cannot be read gives the placeholder, which is not cached
    other = "cd" * 32
    Thumbnails(path_of, cache)(f"assets/{other[:2]}/{other}.png", 96)
    assert not (cache / f"{other}-96.jpg").exists()


def test_thumbnails_cached_from_memory_equal_those_of_the_file(tmp_path) -> None:
    """What the upscale task caches from the image in memory is what the sheet would make from the PNG."""
    import base64
    import hashlib

    import numpy as np
    from PIL import Image

    from atelier.contact_sheet import FINAL_THUMB, MARKDOWN_FINAL_THUMB, cache_thumbnails, thumbnail

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (216, 384, 3), dtype=np.uint8))
    png = tmp_path / "final.png"
    image.save(png)
    sha = hashlib.sha256(png.read_bytes()).hexdigest()
    cache_thumbnails(tmp_path / "thumbs", sha, image)
    for size in (FINAL_THUMB, MARKDOWN_FINAL_THUMB):
        cached = (tmp_path / "thumbs" / f"{sha}-{size}.jpg").read_bytes()
        assert thumbnail(png, size) == "data:image/jpeg;base64," + base64.b64encode(cached).decode()
    assert image.size == (384, 216)  # the caller's image is left as it was
    with pytest.raises(ValueError, match="not a sha256"):
        cache_thumbnails(tmp_path / "thumbs", "final", image)


# --------------------------------------------------------------- last: a second run changes the store
def test_report_marks_what_each_run_kept(run, tmp_path) -> None:
    """keep 2 -> 1: the drafts are reused and scored again; each run's report shows its own selection."""
    from tests.conftest import copy_home

    run = {**run, "home": copy_home(run["home"], tmp_path / "home")}  # the shared run's home stays as it was
    edited = run["brief"].with_name("keep-one.yaml")
    edited.write_text(run["brief"].read_text().replace("drafts: 4\n    keep: 2", "drafts: 4\n    keep: 1"))
    res = run["runner"].invoke(app, ["run", str(edited), "--home", str(run["home"]), "--no-report"])
    assert res.exit_code == 0, res.output
    latest, first = _json(run, "report"), _json(run, "report", run["run_id"])
    assert latest["run"]["id"] != run["run_id"]
    kept = [[d["rank"] for d in r["deliverables"]["hero"]["draft"] if d["kept"]] for r in (first, latest)]
    assert sorted(kept[0]) == [1, 2] and kept[1] == [1]
    assert latest["deliverables"]["hero"]["stages"]["draft"]["computed"] == 0
