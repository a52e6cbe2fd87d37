"""Faces on real photographs: dlib's CNN detector, the identity check after face restore, the models listing.

Photographs: scikit-image's astronaut (Eileen Collins) and chelsea (a cat), matplotlib's grace_hopper: public
sample images inside installed packages. dlib's CNN costs ~2 s of one core per 512² image, so each photograph
is detected once per module (``found``) where a test does not need its own run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from atelier import faces
from atelier.profiles import FACE_DETECTOR_HAAR, FACE_IDENTITY
from stages import postedit
from stages.protocol import Input


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut_path) -> dict[str, Path]:
    from skimage import data

    cbook = pytest.importorskip("matplotlib.cbook")
    folder = tmp_path_factory.mktemp("faces")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        Image.open(f).convert("RGB").save(folder / "grace_hopper.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.png")
    return {"astronaut": astronaut_path, "grace_hopper": folder / "grace_hopper.png", "chelsea": folder / "chelsea.png"}


@pytest.fixture(scope="module")
def found(photos, models) -> dict[str, postedit.Output]:
    """The face-mask stage (dlib CNN, the profiles' default detector) on each photograph, once."""
    names = list(photos)
    req = postedit.FaceMaskRequest(sources=tuple(Input(n, photos[n]) for n in names))
    return dict(zip(names, postedit.face_masks(req, models)))


def _centre(box) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2, y + h / 2


# ------------------------------------------------------------------------------------------- detection
def test_dlib_cnn_finds_each_real_face_and_no_face_on_the_cat(found) -> None:
    astro, grace, cat = found["astronaut"].facts, found["grace_hopper"].facts, found["chelsea"].facts
    assert astro["detector"] == "dlib-cnn-face-detector"
    # Eileen Collins' face in the 512x512 photograph: around x 170-260, y 60-170 (measured box 168,69 96x96)
    [box] = astro["faces"]
    cx, cy = _centre(box)
    assert 190 <= cx <= 240 and 90 <= cy <= 140 and 70 <= box[2] <= 130
    # Grace Hopper's face in the 512x600 portrait (measured box 191,146 165x165)
    [gbox] = grace["faces"]
    gx, gy = _centre(gbox)
    assert 230 <= gx <= 320 and 180 <= gy <= 280 and 120 <= gbox[2] <= 220
    # confidences ~1.07-1.09; dlib's own cut is 0
    assert min(astro["face_scores"] + grace["face_scores"]) > 0.5
    assert cat["faces"] == [] and cat["face_scores"] == []


def test_face_mask_covers_the_detected_face_and_little_else(found) -> None:
    out = found["astronaut"]
    m = np.asarray(out.image) > 0
    [(x, y, w, h)] = out.facts["faces"]
    assert m[y + h // 2, x + w // 2]  # the face centre is repainted
    assert m.sum() < 0.2 * m.size and not m[:, : max(0, x - w)].any()  # and little else
    assert not (np.asarray(found["chelsea"].image) > 0).any()  # no face: nothing to repaint


def test_haar_stays_available_as_the_fallback(models, photos) -> None:
    detector = models.face_detector(FACE_DETECTOR_HAAR)
    [face] = faces.detect(detector, Image.open(photos["astronaut"]).convert("RGB"), max_faces=4)
    cx, cy = _centre(face.box)
    assert 190 <= cx <= 240 and 90 <= cy <= 140


def test_face_and_safety_models_are_listed_as_available_offline(tmp_path) -> None:
    from atelier.cli.models import model_rows

    rows = {(r["profile"], r["role"]): r for r in model_rows(tmp_path)}
    for role, file in (("face_detector", "mmod_human_face_detector.dat"),
                       ("face_identity", "dlib_face_recognition_resnet_model_v1.dat"), ("safety", "open-nsfw.onnx")):
        for profile in ("tiny", "micro", "sdxl-lcm"):
            row = rows[(profile, role)]
            assert row["available"] is True and row["where"].endswith(file), row


# -------------------------------------------------------------------------------------------- identity
def _restore(models, tiny_profile, path: Path, **kw) -> postedit.Output:
    req = postedit.FaceRequest(sources=(Input("src", path),), face=tiny_profile.face, face_size=128, **kw)
    [out] = postedit.restore_faces(req, models)
    return out


def test_a_restoration_that_keeps_the_person_is_used(models, tiny_profile, photos, monkeypatch) -> None:
    # A stand-in restorer that keeps who it is: an unsharp mask (what a good restorer's sharpening resembles).
    monkeypatch.setattr(postedit, "_restore_crop",
                        lambda net, crop, size: crop.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=0)))
    out = _restore(models, tiny_profile, photos["astronaut"])
    [check] = out.facts["identity"]
    assert check["restored"] is True and check["distance"] < 0.4  # measured 0.25; one person < 0.6
    assert out.facts["identity_threshold"] == faces.SAME_PERSON
    assert not np.array_equal(np.asarray(out.image), np.asarray(Image.open(photos["astronaut"]).convert("RGB")))


def test_a_face_swapped_in_from_another_photo_is_caught(models, tiny_profile, photos, found, monkeypatch) -> None:
    """The 'restorer' pastes Grace Hopper's face (her detected box, same margin) over Eileen Collins': the
    identity check sees another person and keeps the original face."""
    grace = Image.open(photos["grace_hopper"]).convert("RGB")
    x, y, w, h = found["grace_hopper"].facts["faces"][0]
    theirs = grace.crop((round(x - w / 2), round(y - h / 2), round(x + 1.5 * w), round(y + 1.5 * h)))
    monkeypatch.setattr(postedit, "_restore_crop", lambda net, crop, size: theirs.resize(crop.size, Image.Resampling.LANCZOS))
    out = _restore(models, tiny_profile, photos["astronaut"])
    [check] = out.facts["identity"]
    assert check["restored"] is False and check["distance"] > 0.6  # measured 0.68
    source = np.asarray(Image.open(photos["astronaut"]).convert("RGB"))
    assert np.array_equal(np.asarray(out.image), source)  # the original face stays


def test_identity_of_one_person_vs_another(models, photos, found) -> None:
    """dlib's ResNet on the photographs themselves: a JPEG-q30 copy of a face is one person, two people are not."""
    import io

    embedder = models.face_embedder(FACE_IDENTITY)
    astro = Image.open(photos["astronaut"]).convert("RGB")
    grace = Image.open(photos["grace_hopper"]).convert("RGB")
    abox, gbox = (tuple(found[n].facts["faces"][0]) for n in ("astronaut", "grace_hopper"))
    buf = io.BytesIO()
    astro.save(buf, "JPEG", quality=30)
    a = faces.embed(embedder, astro, abox)
    same = faces.distance(a, faces.embed(embedder, Image.open(buf).convert("RGB"), abox))
    other = faces.distance(a, faces.embed(embedder, grace, gbox))
    assert same < 0.3 < faces.SAME_PERSON < other  # measured 0.18 and 0.69
