"""Faces: find them (dlib's CNN detector, OpenCV Haar as fallback) and tell who they are (dlib's ResNet).

Real pretrained weights that ship inside packages, so they work offline (see README "Models inside packages"):
- detection: dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``, 0.7 MB, from
  ``face-recognition-models``; King, "Max-Margin Object Detection", 2015), run by ``dlib-bin``;
- identity: dlib's ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1.dat``, 22 MB): a
  128-d embedding of a face aligned by the 5-point landmark model; two photos of one person are < 0.6 apart
  (dlib's documented threshold, 99.38% on LFW);
- fallback detector: OpenCV's Haar cascade (ships with opencv-python < 5): no landmarks, frontal faces only,
  false positives on textures; a profile chooses it with ``face_detector=FACE_DETECTOR_HAAR``.

Nothing here loads a model by itself: ``atelier.models.Models`` loads each once per process through
``load_detector`` / ``load_embedder`` and passes it in. dlib is imported inside those loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from atelier.profiles import ModelSpec

SAME_PERSON = 0.6  # dlib's documented distance below which two faces are one person
CNN_WORK_SIDE = 1024  # larger images are shrunk to this long side first: the CNN's cost grows with the pixels
CNN_MIN_SIDE = 512  # smaller images are upsampled once (x2, dlib's pyramid): the CNN's window is ~80 px


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, w, h in image px
    score: float  # the detector's confidence (dlib CNN: ~1.0 for a clear face; Haar: 1.0, it has none)


@dataclass(frozen=True)
class Detector:
    """A loaded detector: ``kind`` is the spec's (dlib | opencv-haar), ``net`` the library object."""

    name: str
    kind: str
    net: Any


@dataclass(frozen=True)
class Embedder:
    """dlib's 5-point landmark model + ResNet face descriptor."""

    name: str
    landmarks: Any
    resnet: Any


# ------------------------------------------------------------------------------------------ loaders
def load_detector(spec: ModelSpec, path: Path) -> Detector:
    if spec.kind == "dlib" and spec.arch == "cnn-face-detector":
        import dlib

        return Detector(spec.name, "dlib", dlib.cnn_face_detection_model_v1(str(path)))
    if spec.kind == "opencv-haar":
        import cv2

        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"OpenCV could not load {path}; install opencv-python<5 (5.x dropped the cascades)")
        return Detector(spec.name, "opencv-haar", cascade)
    raise ValueError(f"model {spec.name!r} is not a face detector (kind {spec.kind!r}, arch {spec.arch!r}); "
                     "known: dlib / cnn-face-detector, opencv-haar")


def load_embedder(spec: ModelSpec, path: Path, landmarks: Path) -> Embedder:
    if not (spec.kind == "dlib" and spec.arch == "face-recognition"):
        raise ValueError(f"model {spec.name!r} is not a face identity model (kind {spec.kind!r}, arch {spec.arch!r}); "
                         "known: dlib / face-recognition")
    import dlib

    return Embedder(spec.name, dlib.shape_predictor(str(landmarks)), dlib.face_recognition_model_v1(str(path)))


# ---------------------------------------------------------------------------------------- detection
def detect(detector: Detector, image: Image.Image, max_faces: int) -> list[Face]:
    """Faces in ``image``, largest first, at most ``max_faces``; boxes clipped to the image."""
    if detector.kind == "dlib":
        faces = _detect_cnn(detector.net, image)
    else:
        faces = _detect_haar(detector.net, image)
    w, h = image.size
    clipped = []
    for f in faces:
        x, y, bw, bh = f.box
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + bw), min(h, y + bh)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            clipped.append(Face((x0, y0, x1 - x0, y1 - y0), f.score))
    return sorted(clipped, key=lambda f: -f.box[2] * f.box[3])[:max_faces]


def _detect_cnn(net: Any, image: Image.Image) -> list[Face]:
    """dlib's MMOD CNN at a bounded working size. It finds faces of ~80 px and more in what it looks at (~2 s of
    one core per 512² px): images over ``CNN_WORK_SIDE`` are shrunk to it (faces >= ~8% of the long side are
    found), images under ``CNN_MIN_SIDE`` upsampled once (faces >= ~40 px)."""
    scale = min(1.0, CNN_WORK_SIDE / max(image.size))
    work = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)),
                                                   Image.Resampling.LANCZOS)
    upsample = 1 if max(work.size) < CNN_MIN_SIDE else 0
    dets = net(np.asarray(work.convert("RGB")), upsample)
    return [Face((round(d.rect.left() / scale), round(d.rect.top() / scale), round(d.rect.width() / scale),
                  round(d.rect.height() / scale)), round(float(d.confidence), 4)) for d in dets]


def _detect_haar(cascade: Any, image: Image.Image) -> list[Face]:
    import cv2

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    side = max(24, min(image.size) // 12)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    return [Face(tuple(int(v) for v in b), 1.0) for b in found]


# ----------------------------------------------------------------------------------------- identity
def embed(embedder: Embedder, image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 128-d identity of the face in ``box``: 5 landmarks found inside the box, the face aligned on them
    (dlib's 150 px chip), then the ResNet descriptor. (128,) float64, unit-ish norm."""
    import dlib

    x, y, w, h = box
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    shape = embedder.landmarks(rgb, dlib.rectangle(int(x), int(y), int(x + w - 1), int(y + h - 1)))
    return np.asarray(embedder.resnet.compute_face_descriptor(rgb, shape), dtype=np.float64)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two identities: < ``SAME_PERSON`` (0.6) is one person."""
    return float(np.linalg.norm(a - b))
