"""Brief validation: every bad brief gets one line naming file and field; good briefs parse fully."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from atelier.brief import fit_to_area, load_brief
from atelier.cli import app
from atelier.errors import BriefError
from tests.conftest import write_brief

GOOD = """\
campaign: spring-launch
profile: tiny
seed: 1234
brand:
  style_refs: [refs/*.jpg]
  negative: "blurry, watermark"
deliverables:
  - name: hero
    prompt: "a red bicycle against a sunlit brick wall"
    negative: "people"
    aspect: "16:9"
    drafts: 8
    keep: 2
    size: 4k
    post:
      inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}
      face_restore: true
      upscale: true
"""


def test_good_brief_parses(brief_dir: Path) -> None:
    c = load_brief(write_brief(brief_dir, GOOD))
    b = c.brief
    assert b.campaign == "spring-launch" and b.seed == 1234
    assert [p.name for p in c.style_refs] == ["chelsea.jpg", "coffee.jpg"]
    d = b.deliverables[0]
    assert d.final_size() == (3840, 2160)
    assert d.post.inpaint.region == (0.7, 0.0, 0.3, 0.2)
    assert len(c.sha256) == 64


@pytest.mark.parametrize("size, aspect, expected", [
    ("4k", "16:9", (3840, 2160)), ("2k", "1:1", (2048, 2048)), ("1080p", "16:9", (1920, 1080)),
    ("1080p", "4:5", (1536, 1920)), ("1000x500", "1:1", (1000, 500)),
])
def test_final_sizes(brief_dir: Path, size: str, aspect: str, expected) -> None:
    text = GOOD.replace("size: 4k", f"size: {size}").replace('aspect: "16:9"', f'aspect: "{aspect}"')
    assert load_brief(write_brief(brief_dir, text)).brief.deliverables[0].final_size() == expected


def test_rounds_and_review(brief_dir: Path) -> None:
    text = GOOD.replace("seed: 1234", "seed: 1234\nreview: true\nrounds: [{vary: strong, drafts: 3, keep: 2}]")
    text = text.replace("keep: 2\n", "keep: 2\n    rounds:\n      - {vary: 0.3, drafts: 2, keep: 3, prompt: 'a blue bicycle'}\n"
                        "      - {prompt_append: 'at night', keep: 1}\n", 1)
    b = load_brief(write_brief(brief_dir, text)).brief
    d = b.deliverables[0]
    rounds = b.rounds_of(d)
    assert [r.strength for r in rounds] == [0.3, 0.5] and [r.keep for r in rounds] == [3, 1]
    assert [d.prompt_at(rounds, n) for n in range(3)] == [d.prompt, "a blue bicycle", "a blue bicycle, at night"]
    assert b.review_of(d) == "every" and all(b.reviewed_at(d, n) for n in range(3))
    last = load_brief(write_brief(brief_dir, GOOD.replace("keep: 2\n", "keep: 2\n    review: last\n"))).brief
    d = last.deliverables[0]
    assert [last.reviewed_at(d, n) for n in range(2)] == [True, False]  # no rounds: round 0 is the last
    plain = load_brief(write_brief(brief_dir, GOOD)).brief
    assert last.rounds_of(d) == () and plain.review_of(plain.deliverables[0]) is None
    assert last.review_of(d, override=False) == "last" and last.review_of(d, override=True) == "every"


def test_budget(brief_dir: Path) -> None:
    assert load_brief(write_brief(brief_dir, GOOD)).brief.budget is None
    b = load_brief(write_brief(brief_dir, GOOD.replace("seed: 1234", "seed: 1234\nbudget: {usd: 2.5}"))).brief
    assert b.budget.usd == 2.5


def test_fit_to_area() -> None:
    w, h = fit_to_area(16 / 9, 1024 * 1024, 64)
    assert (w, h) == (1344, 768)
    assert w % 64 == 0 and h % 64 == 0


# (replace this, with that) -> (field expected in the message, words expected in the message)
BAD = [
    ("campaign: spring-launch", "campaign: spring launch!", "campaign", "letters, digits"),
    ("campaign: spring-launch\n", "", "campaign", "required"),
    ("seed: 1234", "seed: lots", "seed", "integer"),
    ("seed: 1234", "seed: 1234\ncolour: red", "colour", "unknown key"),
    ('aspect: "16:9"', 'aspect: "wide"', "deliverables[0].aspect", 'expected W:H like 16:9, got "wide"'),
    ('aspect: "16:9"', 'aspect: "20:1"', "deliverables[0].aspect", "between 1:4 and 4:1"),
    ("drafts: 8", "drafts: 1000", "deliverables[0].drafts", "less than or equal"),
    ("drafts: 8", "drafts: 0", "deliverables[0].drafts", "greater than or equal"),
    ("keep: 2", "keep: 9", "deliverables[0]", "keep (9) must be <= drafts (8)"),
    ("size: 4k", "size: huge", "deliverables[0].size", "expected 4k, 2k, 1080p or WxH"),
    ("size: 4k", "size: 100000x100", "deliverables[0].size", "between 64 and 8192"),
    ("region: [0.7, 0.0, 0.3, 0.2]", "region: [0.9, 0.0, 0.3, 0.2]", "deliverables[0].post.inpaint.region",
     "outside the image"),
    ("region: [0.7, 0.0, 0.3, 0.2]", "region: [0.7, 0.0, 0.3, -0.2]", "deliverables[0].post.inpaint.region",
     "fractions"),
    ("face_restore: true", "face_restore: maybe", "deliverables[0].post.face_restore",
     'expected true or false, got the text "maybe"'),
    ("profile: tiny", "profile: enormous", "profile", 'unknown profile "enormous"; known: tiny'),
    ("style_refs: [refs/*.jpg]", "style_refs: [refs/*.png]", "brand.style_refs[0]", "matches no file"),
    ("style_refs: [refs/*.jpg]", "style_refs: [refs/missing.jpg]", "brand.style_refs[0]", "no such file"),
    ("style_refs: [refs/*.jpg]", "style_refs: [../outside.jpg]", "brand.style_refs[0]", "outside the brief's folder"),
    ("style_refs: [refs/*.jpg]", "style_refs: [/etc/hostname]", "brand.style_refs[0]", "relative"),
    ("style_refs: [refs/*.jpg]", "style_refs: [refs/notes.txt]", "brand.style_refs[0]", "not a readable image"),
    ("style_refs: [refs/*.jpg]", "style_refs: []", "brand.style_refs", "at least 1"),
    ("    post:\n", '  - name: hero\n    prompt: "again"\n    post:\n', "deliverables", 'duplicate deliverable name "hero"'),
    ('inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}', 'inpaint: {prompt: "plain wall"}',
     "deliverables[0].post.inpaint", "exactly one of region"),
    ('inpaint: {region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}', 'inpaint: {mask: refs/nope.png, prompt: "x"}',
     "deliverables[0].post.inpaint.mask", "no such file"),
    ("keep: 2", "keep: 2\n    rounds: [{vary: wild}]", "deliverables[0].rounds[0].vary", "expected subtle, strong or a"),
    ("keep: 2", "keep: 2\n    rounds: [{vary: 1.5}]", "deliverables[0].rounds[0].vary", "(0, 1]"),
    ("keep: 2", "keep: 2\n    rounds: [{drafts: 2, keep: 5}]", "deliverables[0].rounds[0].keep",
     "keep (5) must be <= the 2 image(s) kept before x drafts (2) = 4"),
    ("keep: 2", "keep: 2\n    rounds: [{keep: 1}, {drafts: 1, keep: 2}]", "deliverables[0].rounds[1].keep", "= 1"),
    ("keep: 2", "keep: 2\n    rounds: [{stars: 3}]", "deliverables[0].rounds[0].stars", "unknown key"),
    ("keep: 2", "keep: 2\n    review: sometimes", "deliverables[0].review", "every"),
    ("seed: 1234", "seed: 1234\nrounds: [{drafts: 1, keep: 3}]", "rounds[0].keep", "(deliverable hero)"),
    ("seed: 1234", "seed: 1234\nbudget: {usd: 0}", "budget.usd", "greater than 0"),
    ("seed: 1234", "seed: 1234\nbudget: {usd: -5}", "budget.usd", "greater than 0"),
    ("seed: 1234", "seed: 1234\nbudget: {usd: lots}", "budget.usd", 'expected a number, got the text "lots"'),
    ("seed: 1234", "seed: 1234\nbudget: {usd: .inf}", "budget.usd", "finite number"),
    ("seed: 1234", "seed: 1234\nbudget: {usd: 5, eur: 5}", "budget.eur", "unknown key"),
    ("seed: 1234", "seed: 1234\nbudget: 20", "budget", "expected a mapping like {usd: 20}"),
]


@pytest.mark.parametrize("old, new, field, words", BAD, ids=[f"{b[2]}:{b[3][:20]}" for b in BAD])
def test_bad_briefs_name_file_and_field(brief_dir: Path, old: str, new: str, field: str, words: str) -> None:
    (brief_dir / "outside.jpg").write_bytes((brief_dir / "refs" / "coffee.jpg").read_bytes())
    (brief_dir / "refs" / "notes.txt").write_text("not an image")
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = write_brief(brief_dir, text)
    with pytest.raises(BriefError) as info:
        load_brief(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert words in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text, words", [
    ("campaign: [unclosed", "YAML syntax error: line 1"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_not_a_brief(brief_dir: Path, text: str, words: str) -> None:
    with pytest.raises(BriefError, match=words):
        load_brief(write_brief(brief_dir, text))


def test_validate_cli_exit_codes(brief_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    good = write_brief(brief_dir, GOOD)
    ok = runner.invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "1 deliverable" in ok.output
    bad = write_brief(brief_dir, GOOD.replace('aspect: "16:9"', 'aspect: "wide"'), "bad.yaml")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert f'{bad}: deliverables[0].aspect: expected W:H like 16:9, got "wide"' in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_run_with_bad_brief_writes_nothing(brief_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bad = write_brief(brief_dir, GOOD.replace("keep: 2", "keep: 20"), "bad.yaml")
    res = CliRunner().invoke(app, ["run", str(bad), "--home", str(home)])
    assert res.exit_code == 2
    assert "keep (20) must be <= drafts (8)" in " ".join(res.output.split())
    assert not home.exists()


def test_run_with_unknown_profile_option(brief_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = CliRunner().invoke(app, ["run", str(write_brief(brief_dir, GOOD)), "--profile", "nope", "--home", str(home)])
    assert res.exit_code == 2
    assert "unknown profile 'nope'" in res.output
    assert not home.exists()


@pytest.mark.parametrize("inpaint, ok", [
    ('{region: [0.1, 0.1, 0.5, 0.5], shape: ellipse, prompt: "sky"}', True),
    ('{faces: true, prompt: "a smiling face"}', True),
    ('{faces: true, region: [0.1, 0.1, 0.5, 0.5], prompt: "x"}', False),
    ('{region: [0.1, 0.1, 0.5, 0.5], shape: star, prompt: "x"}', False),
])
def test_inpaint_mask_sources(brief_dir: Path, inpaint: str, ok: bool) -> None:
    text = GOOD.replace('{region: [0.7, 0.0, 0.3, 0.2], prompt: "plain wall"}', inpaint)
    path = write_brief(brief_dir, text)
    if ok:
        assert load_brief(path).brief.deliverables[0].post.inpaint.prompt
    else:
        with pytest.raises(BriefError, match=r"deliverables\[0\]\.post\.inpaint"):
            load_brief(path)


def test_stage_overrides_apply_to_the_profile(brief_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(brief_dir / "refs" / "style.safetensors"))
    text = GOOD + """stages:
  draft: {steps: 2, scheduler: euler-a}
  refine: {guidance: 4.5, strength: 0.4, loras: [{source: refs/style.safetensors, scale: 0.7}]}
  ip_adapter_scale: 0.3
"""
    c = load_brief(write_brief(brief_dir, text))
    prof = c.profile()
    assert (prof.draft.steps, prof.draft.scheduler) == (2, "euler-a")
    assert prof.draft.guidance == 1.0  # untouched settings keep the profile's values
    assert (prof.refine.guidance, prof.refine.strength, prof.ip_adapter_scale) == (4.5, 0.4, 0.3)
    [lora] = prof.refine_model.loras
    assert lora.scale == 0.7 and lora.source == str((brief_dir / "refs" / "style.safetensors").resolve())
    assert prof.draft_model.loras == ()


@pytest.mark.parametrize("stages, field, words", [
    ("  draft: {scheduler: heun}", "stages.draft.scheduler", 'unknown scheduler "heun"'),
    ("  refine: {steps: 0}", "stages.refine.steps", "greater than or equal"),
    ("  draft: {loras: [{source: missing.safetensors}]}", "stages.draft.loras[0].source", "no such file"),
    ("  draft: {loras: [{source: ../x.safetensors}]}", "stages.draft.loras[0].source", "no such file"),
    ("  draft: {colour: red}", "stages.draft.colour", "unknown key"),
])
def test_bad_stage_overrides(brief_dir: Path, stages: str, field: str, words: str) -> None:
    path = write_brief(brief_dir, GOOD + "stages:\n" + stages + "\n")
    with pytest.raises(BriefError) as info:
        load_brief(path)
    assert str(info.value).startswith(f"{path}: {field}: ") and words in str(info.value), str(info.value)
