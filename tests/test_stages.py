"""Each stage on tiny random-weight models: the real diffusers / open_clip / GFPGAN / Real-ESRGAN paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import draft, moodboard, postedit, refine, select
from stages.protocol import Input
from tests.conftest import DEMO_REFS

REFS = tuple(sorted(DEMO_REFS.glob("*.jpg")))


REF_INPUTS = tuple(Input(f"ref{i}", p) for i, p in enumerate(REFS))


def _inputs(paths) -> tuple[Input, ...]:
    return tuple(Input(f"k{i}", Path(p)) for i, p in enumerate(paths))


def _save(images, folder: Path, prefix: str) -> tuple[Input, ...]:
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{prefix}{i}.png"
        im.save(p)
        paths.append(Input(f"{prefix}{i}", p))
    return tuple(paths)


def _draft_req(tiny_profile, seeds, batch_size=4, prompt="a red bicycle"):
    seeds = tuple(seeds)
    return draft.DraftRequest(prompt=prompt, negative="blurry", seeds=seeds, indices=tuple(range(len(seeds))),
                              width=80, height=48, steps=tiny_profile.draft.steps,
                              guidance=tiny_profile.draft.guidance, scheduler="lcm", model=tiny_profile.draft_model,
                              batch_size=batch_size)


# ----------------------------------------------------------------------------------------- moodboard
def test_moodboard_embeds_and_ranks_references(models, tiny_profile, tmp_path) -> None:
    req = moodboard.MoodboardRequest(references=REF_INPUTS, clip=tiny_profile.clip, max_style_refs=2)
    board = moodboard.build_moodboard(req, models)
    assert board.embeddings.shape == (len(REFS), 32)
    np.testing.assert_allclose(np.linalg.norm(board.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(board.centroid), 1.0, atol=1e-5)
    assert len(board.style_refs) == 2
    # the kept references are the most central ones
    best = sorted(range(len(REFS)), key=lambda i: -board.centrality[i])[:2]
    assert list(board.style_refs) == best
    # round trip through the stored file
    path = tmp_path / "board.npz"
    path.write_bytes(board.to_bytes())
    again = moodboard.Moodboard.from_file(path)
    np.testing.assert_array_equal(again.embeddings, board.embeddings)
    assert again.style_refs == board.style_refs


def test_moodboard_needs_references(models, tiny_profile) -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        moodboard.build_moodboard(moodboard.MoodboardRequest(max_style_refs=4, references=(), clip=tiny_profile.clip),
                                  models)


# -------------------------------------------------------------------------------------------- drafts
def test_drafts_are_seeded_per_image(models, tiny_profile) -> None:
    a = draft.generate_drafts(_draft_req(tiny_profile, [1, 2, 3], batch_size=3), models)
    b = draft.generate_drafts(_draft_req(tiny_profile, [3, 1], batch_size=1), models)
    assert len(a) == 3 and len(b) == 2
    assert all(d.image.size == (80, 48) for d in a)
    # image for seed 1 and 3 do not depend on batch size or position
    assert np.abs(np.asarray(a[0].image, int) - np.asarray(b[1].image, int)).max() <= 1
    assert np.abs(np.asarray(a[2].image, int) - np.asarray(b[0].image, int)).max() <= 1
    # different seeds give different images
    assert np.abs(np.asarray(a[0].image, int) - np.asarray(a[1].image, int)).mean() > 1


def test_drafts_report_progress(models, tiny_profile) -> None:
    seen = []
    draft.generate_drafts(_draft_req(tiny_profile, [1, 2, 3], batch_size=2), models,
                          on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 3), (3, 3)]


def test_draft_rejects_bad_sizes(models, tiny_profile) -> None:
    req = _draft_req(tiny_profile, [1])
    with pytest.raises(ValueError, match="multiples of 8"):
        draft.generate_drafts(draft.DraftRequest(**{**req.__dict__, "width": 81}), models)


# ----------------------------------------------------------------------------------------- selection
def test_mmr_avoids_near_duplicates() -> None:
    # items 0 and 1 are identical and best; 2 is different and slightly worse.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    base = np.array([1.0, 0.99, 0.8])
    kept, penalty = select.mmr(base, x @ x.T, keep=2, diversity=0.5)
    assert kept == [0, 2]
    assert penalty[1] == pytest.approx(0.5)  # the duplicate is penalised by its similarity to a kept one
    kept_no_div, _ = select.mmr(base, x @ x.T, keep=2, diversity=0.0)
    assert kept_no_div == [0, 1]


def test_select_scores_every_draft(models, tiny_profile, tmp_path) -> None:
    drafts = draft.generate_drafts(_draft_req(tiny_profile, range(6)), models)
    paths = _save([d.image for d in drafts], tmp_path, "d")
    board = moodboard.build_moodboard(moodboard.MoodboardRequest(max_style_refs=4, references=REF_INPUTS,
                                                                 clip=tiny_profile.clip), models)
    (tmp_path / "board.npz").write_bytes(board.to_bytes())
    board_in = Input("board", tmp_path / "board.npz")
    sel = select.select_drafts(select.SelectRequest(prompt="a red bicycle", drafts=paths, moodboard=board_in, keep=2,
                                                    weights=(1.0, 0.5, 0.3), clip=tiny_profile.clip), models)
    assert len(sel.scores) == 6 and len(sel.kept) == 2 and len(set(sel.kept)) == 2
    ranks = {s.index: s.rank for s in sel.scores if s.rank is not None}
    assert ranks == {sel.kept[0]: 1, sel.kept[1]: 2}
    first = sel.scores[sel.kept[0]]
    best_base = max(s.prompt_score + 0.5 * s.moodboard_score for s in sel.scores)
    assert first.total == pytest.approx(best_base, abs=1e-6)  # rank 1 = best prompt + mood-board fit
    assert first.diversity_penalty == 0.0
    assert all(-1 <= s.prompt_score <= 1 and -1 <= s.moodboard_score <= 1 for s in sel.scores)
    with pytest.raises(ValueError, match="keep must be"):
        select.select_drafts(select.SelectRequest(prompt="x", drafts=paths, moodboard=board_in, keep=7,
                                                  weights=(1.0, 0.5, 0.3), clip=tiny_profile.clip), models)


# -------------------------------------------------------------------------------------------- refine
def _refine_req(tiny_profile, inits, scale=0.6, style_refs=REF_INPUTS[:2]):
    return refine.RefineRequest(prompt="a red bicycle", negative="blurry", inits=inits, seeds=tuple(range(len(inits))),
                                style_refs=style_refs, width=96, height=64, steps=4, guidance=5.0, strength=0.6,
                                scheduler="euler", ip_adapter_scale=scale, model=tiny_profile.refine_model,
                                ip_adapter=tiny_profile.ip_adapter, batch_size=2)


def test_refine_uses_init_and_ip_adapter(models, tiny_profile, tmp_path) -> None:
    drafts = draft.generate_drafts(_draft_req(tiny_profile, [5, 6]), models)
    inits = _save([d.image for d in drafts], tmp_path, "init")
    out = [o.image for o in refine.refine(_refine_req(tiny_profile, inits), models)]
    assert len(out) == 2 and all(im.size == (96, 64) for im in out)
    again = [o.image for o in refine.refine(_refine_req(tiny_profile, inits), models)]
    assert np.abs(np.asarray(out[0], int) - np.asarray(again[0], int)).max() <= 1  # reproducible
    no_style = [o.image for o in refine.refine(_refine_req(tiny_profile, inits, scale=0.0), models)]
    other_style = [o.image for o in refine.refine(_refine_req(tiny_profile, inits, style_refs=REF_INPUTS[2:]), models)]
    # the IP-Adapter really conditions the UNet: its scale and its reference images change the result
    assert np.abs(np.asarray(out[0], int) - np.asarray(no_style[0], int)).mean() > 0.5
    assert np.abs(np.asarray(out[0], int) - np.asarray(other_style[0], int)).mean() > 0.5


def test_refine_requires_style_refs(models, tiny_profile, tmp_path) -> None:
    with pytest.raises(ValueError, match="style reference"):
        refine.refine(_refine_req(tiny_profile, _inputs([tmp_path / "x.png"]), style_refs=()), models)


# ----------------------------------------------------------------------------------------- post-edit
def test_inpaint_changes_only_the_mask(models, tiny_profile, tmp_path) -> None:
    src = tmp_path / "src.png"
    Image.open(REFS[0]).convert("RGB").resize((100, 60)).save(src)  # deliberately not a multiple of 8
    mask = postedit.region_mask((100, 60), (0.7, 0.0, 0.3, 0.2))
    mask.save(tmp_path / "mask.png")
    m = np.asarray(mask) > 0
    assert m.sum() == 30 * 12
    [out] = postedit.inpaint(postedit.InpaintRequest(
        sources=_inputs([src]), masks=(Input("mask", tmp_path / "mask.png"),), prompt="plain wall", negative="",
        seeds=(1,), steps=4, guidance=5.0, strength=1.0, scheduler="euler", style_refs=REF_INPUTS[:1],
        ip_adapter_scale=0.6, model=tiny_profile.refine_model, ip_adapter=tiny_profile.ip_adapter, multiple=16), models)
    out = out.image
    a, b = np.asarray(Image.open(src).convert("RGB"), int), np.asarray(out, int)
    assert out.size == (100, 60)
    assert (a[~m] == b[~m]).all()  # outside the mask: the input, exactly
    assert np.abs(a[m] - b[m]).mean() > 5  # inside: repainted


def test_face_restore_on_a_real_face(models, tiny_profile, astronaut_path) -> None:
    # identity_threshold 2: use whatever the random-weight restorer makes (its noise face is another person:
    # by default the identity check keeps the original, see tests/test_faces.py)
    [res] = postedit.restore_faces(postedit.FaceRequest(sources=_inputs([astronaut_path]), face=tiny_profile.face,
                                                        face_size=128, identity_threshold=2.0), models)
    assert len(res.facts["faces"]) == 1 and res.facts["identity"][0]["restored"] is True
    x, y, w, h = res.facts["faces"][0]
    # Eileen Collins' face in the 512x512 photograph sits around x 170-260, y 60-170
    assert 150 <= x + w / 2 <= 260 and 70 <= y + h / 2 <= 160 and 50 <= w <= 160
    before = np.asarray(Image.open(astronaut_path).convert("RGB"), int)
    after = np.asarray(res.image, int)
    changed = np.abs(before - after).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 0.3 * w * h  # the face was replaced by the (random-weight) restorer's output
    # nothing changed outside the crop around the face (box grown by the 0.5 margin each side)
    cx, cy, side = x + w / 2, y + h / 2, max(w, h) * 2
    assert xs.min() >= cx - side / 2 - 1 and xs.max() <= cx + side / 2 + 1
    assert ys.min() >= cy - side / 2 - 1 and ys.max() <= cy + side / 2 + 1


def test_face_restore_without_faces_is_identity(models, tiny_profile, tmp_path) -> None:
    p = tmp_path / "flat.png"
    Image.new("RGB", (128, 96), (120, 130, 140)).save(p)
    [res] = postedit.restore_faces(postedit.FaceRequest(sources=_inputs([p]), face=tiny_profile.face, face_size=128),
                                   models)
    assert res.facts["faces"] == []
    assert np.array_equal(np.asarray(res.image), np.asarray(Image.open(p).convert("RGB")))


def _upscale_req(src: Path, size, tiny_profile, tile: int) -> postedit.UpscaleRequest:
    return postedit.UpscaleRequest(width=size[0], height=size[1], tile=tile, model=tiny_profile.upscale,
                                   sources=_inputs([src]))


def test_upscale_hits_the_exact_size(models, tiny_profile, tmp_path) -> None:
    src = tmp_path / "small.png"
    Image.open(REFS[0]).convert("RGB").resize((88, 48)).save(src)
    [out] = [o.image for o in postedit.upscale(_upscale_req(src, (384, 216), tiny_profile, 32), models)]
    assert out.size == (384, 216)
    [untiled] = [o.image for o in postedit.upscale(_upscale_req(src, (384, 216), tiny_profile, 512), models)]
    diff = np.abs(np.asarray(out, int) - np.asarray(untiled, int))
    assert diff[8:-8, 8:-8].mean() < 1.0  # tiles with padding: no visible seams


def test_upscale_retries_with_smaller_tiles_on_out_of_memory(models, tiny_profile, tmp_path, monkeypatch) -> None:
    """Fault injection: tiles above 64 px 'run out of CUDA memory'; the stage halves the tile until it fits."""
    import torch
    from realesrgan import RealESRGANer

    src = tmp_path / "small.png"
    Image.open(REFS[0]).convert("RGB").resize((96, 64)).save(src)
    real_enhance = RealESRGANer.enhance
    tiles = []

    def enhance(self, img, outscale=None):
        tiles.append(self.tile_size)
        if self.tile_size > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_enhance(self, img, outscale=outscale)

    monkeypatch.setattr(RealESRGANer, "enhance", enhance)
    [out] = postedit.upscale(_upscale_req(src, (384, 256), tiny_profile, 256), models)
    assert tiles == [256, 128, 64]
    assert out.image.size == (384, 256)
    monkeypatch.setattr(RealESRGANer, "enhance", lambda self, img, outscale=None: (_ for _ in ()).throw(
        torch.OutOfMemoryError("always")))
    with pytest.raises(torch.OutOfMemoryError):
        postedit.upscale(_upscale_req(src, (384, 256), tiny_profile, 64), models)


def test_region_masks_rect_and_ellipse() -> None:
    rect = np.asarray(postedit.region_mask((100, 50), (0.5, 0.0, 0.5, 1.0))) > 0
    assert rect.sum() == 50 * 50 and rect[:, 50:].all() and not rect[:, :50].any()
    ellipse = np.asarray(postedit.region_mask((100, 50), (0.5, 0.0, 0.5, 1.0), "ellipse")) > 0
    assert not ellipse[:, :50].any() and ellipse[25, 75] and not ellipse[0, 51]  # corners are outside
    assert 0.7 * rect.sum() < ellipse.sum() < 0.85 * rect.sum()  # pi/4 of the box
    with pytest.raises(ValueError, match="known: rect, ellipse"):
        postedit.region_mask((10, 10), (0, 0, 1, 1), "star")


def test_face_mask_is_an_ellipse_per_box() -> None:
    m = np.asarray(postedit.face_mask((200, 100), [(20, 20, 40, 40), (120, 30, 20, 20)], grow=0.0)) > 0
    assert m[40, 40] and m[40, 130] and not m[0, 0] and not m[90, 100]
    assert 0.7 * (40 * 40 + 20 * 20) < m.sum() < 0.85 * (40 * 40 + 20 * 20)  # pi/4 of the boxes
    # the faces the real detector finds: tests/test_faces.py
