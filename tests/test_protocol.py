"""The stage protocol: every request field that can change an output is in the asset's key.

For every stage's request, each field is changed in turn (property-style: a change that fits the field's
type); the keys of the items it concerns must change. Input files are identified by key only: moving a
file (same key, new path) and runtime settings (batch size) leave keys alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields, replace
from pathlib import Path

import pytest

from atelier.profiles import ModelSpec
from stages import draft, moodboard, postedit, refine, select, vary
from stages.protocol import Input, Stage, items_of, plan, subset

SD = ModelSpec("sd", "diffusers", "tiny:sd")
IP = ModelSpec("ip", "ip-adapter", "tiny:ip-adapter")
CLIP = ModelSpec("clip", "open-clip", "tiny:open-clip", arch="a")


def _in(name: str, n: int = 2) -> tuple[Input, ...]:
    return tuple(Input(f"{name}{i}", Path(f"/files/{name}{i}.png")) for i in range(n))


REQUESTS: list[tuple[Stage, object]] = [
    (draft.STAGE, draft.DraftRequest(prompt="a red bicycle", negative="blurry", width=64, height=48, steps=4,
                                     guidance=1.0, scheduler="lcm", model=SD, seeds=(1, 2), indices=(0, 1))),
    (refine.STAGE, refine.RefineRequest(prompt="p", negative="n", width=96, height=64, steps=8, guidance=5.0,
                                        strength=0.6, scheduler="euler", ip_adapter_scale=0.6, model=SD, ip_adapter=IP,
                                        style_refs=_in("ref"), inits=_in("init"), seeds=(5, 6))),
    (postedit.INPAINT, postedit.InpaintRequest(prompt="wall", negative="n", steps=6, guidance=5.0, strength=1.0,
                                               scheduler="euler", ip_adapter_scale=0.6, multiple=16, model=SD,
                                               ip_adapter=IP, style_refs=_in("ref"), sources=_in("src"),
                                               masks=_in("mask"), seeds=(5, 6))),
    (postedit.MASK_REGION, postedit.RegionMaskRequest(region=(0.7, 0.0, 0.3, 0.2), shape="rect", width=96, height=64)),
    (postedit.MASK_FILE, postedit.FileMaskRequest(source="mask.png", sha256="ab" * 32, file=Path("/brief/mask.png"))),
    (postedit.MASK_FACES, postedit.FaceMaskRequest(sources=_in("src"))),
    (postedit.FACE_RESTORE, postedit.FaceRequest(face_size=128, face=ModelSpec("f", "gfpgan", "tiny:gfpgan"),
                                                 sources=_in("src"))),
    (postedit.UPSCALE, postedit.UpscaleRequest(width=3840, height=2160, tile=128,
                                               model=ModelSpec("u", "realesrgan", "ncnn:x"), sources=_in("src"))),
    (moodboard.STAGE, moodboard.MoodboardRequest(max_style_refs=4, references=_in("ref", 3), clip=CLIP)),
    (vary.STAGE, vary.VaryRequest(prompt="p", negative="n", width=64, height=64, steps=4, guidance=1.0, strength=0.5,
                                  scheduler="lcm", round=1, model=SD, inits=_in("kept"), seeds=(7, 8), variations=(0, 1))),
    (select.STAGE, select.SelectRequest(prompt="p", keep=2, weights=(1.0, 0.5, 0.3), drafts=_in("d", 4), excluded=(3,),
                                        moodboard=Input("board", Path("/files/board.npz")), clip=CLIP)),
]
IDS = [f"{type(r).__name__}" for _, r in REQUESTS]


def identify(spec: ModelSpec) -> dict:
    return {"name": spec.name, "source": spec.source, "arch": spec.arch}


def keys(stage: Stage, req) -> list[str]:
    return [it.key for it in plan(stage, req, identify)]


def _changed(value):
    """A different value of the same kind (the first element of a tuple changed)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, ModelSpec):
        return replace(value, source=value.source + "-other", name=value.name + "-other")
    if isinstance(value, Input):
        return Input(value.key + "-other", value.path)
    if isinstance(value, str):
        return value + " other"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, tuple) and value:
        return (_changed(value[0]),) + value[1:]
    raise AssertionError(f"no change known for {value!r}")


@pytest.mark.parametrize("stage,req", REQUESTS, ids=IDS)
def test_every_field_that_changes_the_output_changes_the_key(stage: Stage, req) -> None:
    base = keys(stage, req)
    assert len(set(base)) == len(base) == items_of(req)
    for f in fields(req):
        value = getattr(req, f.name)
        if f.metadata.get("runtime"):
            continue
        after = keys(stage, replace(req, **{f.name: _changed(value)}))
        if f.metadata.get("per_item"):
            # only the first item's value changed: its key moves, the others stay
            assert after[0] != base[0], f"{type(req).__name__}.{f.name} is not in the key"
            assert after[1:] == base[1:], f"{type(req).__name__}.{f.name} leaks into other items' keys"
        else:
            assert all(a != b for a, b in zip(after, base)), f"{type(req).__name__}.{f.name} is not in the key"


@pytest.mark.parametrize("stage,req", REQUESTS, ids=IDS)
def test_paths_and_runtime_settings_are_not_in_the_key(stage: Stage, req) -> None:
    base = keys(stage, req)
    moved = {}
    for f in fields(req):
        value = getattr(req, f.name)
        if isinstance(value, Input):
            moved[f.name] = Input(value.key, Path("/elsewhere") / value.path.name)
        elif isinstance(value, tuple) and value and isinstance(value[0], Input):
            moved[f.name] = tuple(Input(i.key, Path("/elsewhere") / i.path.name) for i in value)
        elif f.metadata.get("runtime"):
            moved[f.name] = 1 if isinstance(value, int) else Path("/elsewhere/x")
    assert keys(stage, replace(req, **moved)) == base


@pytest.mark.parametrize("stage,req", REQUESTS, ids=IDS)
def test_a_subset_keeps_its_items_keys(stage: Stage, req) -> None:
    """The executor runs the missing items only: their keys must be the same as in the whole request."""
    base = keys(stage, req)
    if items_of(req) < 2:
        assert keys(stage, subset(req, [0])) == base
        return
    assert keys(stage, subset(req, [1])) == [base[1]]
    assert keys(stage, subset(req, [1, 0])) == [base[1], base[0]]


def test_recipes_record_what_the_key_hashes() -> None:
    stage, req = REQUESTS[0]
    [first, second] = plan(stage, req, identify)
    assert first.recipe == {"prompt": "a red bicycle", "negative": "blurry", "width": 64, "height": 48, "steps": 4,
                            "guidance": 1.0, "scheduler": "lcm", "seed": 1, "index": 0}
    assert second.recipe["seed"] == 2 and first.model == identify(SD)
    _, ref = REQUESTS[1]
    [item, _] = plan(refine.STAGE, ref, identify)
    assert item.parents == (("init0", "init"), ("ref0", "style-ref"), ("ref1", "style-ref"))
    assert item.model == {"pipeline": identify(SD), "ip_adapter": identify(IP)}


def test_inpaint_multiple_is_in_the_key() -> None:
    """It changes the working size, hence the output: it was once left out of the key."""
    _, req = REQUESTS[2]
    assert keys(postedit.INPAINT, req) != keys(postedit.INPAINT, replace(req, multiple=8))


def test_mismatched_per_item_lengths_fail() -> None:
    _, req = REQUESTS[0]
    with pytest.raises(ValueError, match="different lengths"):
        plan(draft.STAGE, replace(req, indices=(0,)), identify)


def test_a_path_in_a_recipe_field_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bad:
        where: Path

    with pytest.raises(TypeError, match="cannot be part of a recipe"):
        plan(Stage("bad", 1, lambda r, m: []), Bad(Path("/x")), identify)
