"""Images a person hands us (brand references, inpaint masks): read safely, checked, converted.

``check_image`` is what ``load_brief`` runs on every reference and mask file: it refuses what no stage
could use, each with one ``BriefError`` line naming the brief's file and field:

- a missing file, a directory, a FIFO or device, an empty file, one over ``MAX_INPUT_BYTES``;
- a format outside ``FORMATS`` (Pillow's other plugins are never tried: EPS would run Ghostscript);
- a header declaring more than ``MAX_INPUT_PIXELS`` (a decompression bomb: a few KB that decode to GBs);
- a file that does not decode to the end (truncated, corrupt).

What can be used is converted, the same way at validation and in the stages (``to_rgb`` / ``to_mask``):
the first frame of an animation, EXIF orientation applied, CMYK / palette / 16-bit / float pixels scaled
to 8-bit RGB, transparency flattened (onto white for a reference, black, i.e. "keep", for a mask).

``reread`` is the run-time half: a stage reads the file again and gets the same kind of error when it was
deleted or changed since ``load_brief`` checked it (its sha256 is kept in ``InputImage``).
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from atelier.errors import BriefError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")  # what Pillow may try to open (JPEG covers MPO)
MAX_INPUT_BYTES = 200 * 2**20  # a reference photograph is a few MB; 200 MB is a mistake
MAX_INPUT_PIXELS = 8192 * 8192  # 64 megapixels, as MAX_SIDE for a final; checked from the header, before decoding


@dataclass(frozen=True)
class InputImage:
    """A checked input image: where it is, which field of the brief named it, and what its bytes were."""

    field: str  # e.g. brand.style_refs[0], deliverables[1].post.inpaint.mask
    path: Path  # resolved, inside the brief's folder
    sha256: str  # of the file's bytes when the brief was checked
    size: tuple[int, int]  # (width, height) as used: after EXIF rotation
    mode: str  # as stored (RGB, CMYK, P, I;16...); the stages always see RGB (or L for a mask)
    frames: int  # > 1 for an animation; the stages use the first frame


def _read(file: str, field: str, path: Path) -> bytes:
    """The file's bytes, or one error line: missing, not a regular file, empty or too big."""
    name = path.name or str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BriefError(file, field, f'"{name}": no such file') from None
    except OSError as exc:
        raise BriefError(file, field, f'"{name}": cannot read ({exc.strerror or type(exc).__name__})') from None
    if stat.S_ISDIR(st.st_mode):
        raise BriefError(file, field, f'"{name}" is a directory, not an image')
    if not stat.S_ISREG(st.st_mode):
        raise BriefError(file, field, f'"{name}" is not a regular file')
    if st.st_size == 0:
        raise BriefError(file, field, f'"{name}" is empty (0 bytes)')
    if st.st_size > MAX_INPUT_BYTES:
        raise BriefError(file, field, f'"{name}" is {st.st_size / 2**20:.0f} MB; an input image may be at most '
                                      f"{MAX_INPUT_BYTES // 2**20} MB")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BriefError(file, field, f'"{name}": cannot read ({exc.strerror or type(exc).__name__})') from None


def _open(data: bytes) -> Image.Image:
    """Open (header only) with the allowed formats; refuse a declared size over ``MAX_INPUT_PIXELS``."""
    Image.init()  # registers every plugin once; ``formats=`` then picks among them (a KeyError before)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            m = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's own limit, 2-3x ours, says how many
            raise _TooBig(f"{int(m[1]):,} pixels" if m else "too many pixels") from None
    w, h = im.size
    if w * h > MAX_INPUT_PIXELS:
        raise _TooBig(f"{w}x{h} = {w * h:,} pixels")
    return im


class _TooBig(Exception):
    pass


def _first_frame(im: Image.Image) -> Image.Image:
    """The first frame, decoded, with EXIF orientation applied."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    return ImageOps.exif_transpose(im)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer pixels to L, scaled (Pillow's own convert clips them at 255); float 0..1 too."""
    import numpy as np

    a = np.asarray(im)
    if im.mode == "F":
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):  # "I" (32-bit) says nothing of its range
        a = a / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.nan_to_num(np.clip(a, 0, 255)).round().astype(np.uint8), "L")


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB, with any transparency composited onto ``background``."""
    if im.mode.startswith(("I", "F")):
        im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as the stages use it: first frame, upright, 8-bit RGB, transparency on white."""
    return _flatten(_first_frame(im), (255, 255, 255))


def to_mask(im: Image.Image) -> Image.Image:
    """An opened mask as the stages use it: first frame, upright, 8-bit L; transparent pixels are black (keep)."""
    return _flatten(_first_frame(im), (0, 0, 0)).convert("L")


def decode(data: bytes, mask: bool = False) -> Image.Image:
    """Decode bytes already checked by ``check_image`` (RGB, or L for a mask)."""
    with _open(data) as im:
        return to_mask(im) if mask else to_rgb(im)


def check_image(file: str, field: str, path: Path, mask: bool = False) -> InputImage:
    """Read and fully decode an input image as a stage will; one ``BriefError`` line if it cannot be used."""
    data = _read(file, field, path)
    name = path.name
    try:
        with warnings.catch_warnings(), _open(data) as im:
            warnings.simplefilter("ignore")  # odd TIFF tags, corrupt EXIF: Pillow warns and goes on, and so do we
            warnings.filterwarnings("error", "Truncated File Read")  # but a TIFF missing its pixels is refused
            mode, frames = im.mode, getattr(im, "n_frames", 1)
            converted = to_mask(im) if mask else to_rgb(im)
    except _TooBig as exc:
        raise BriefError(file, field, f'"{name}" declares {exc}; an input image may have at most '
                                      f"{MAX_INPUT_PIXELS // 2**20} megapixels (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise BriefError(file, field, f'"{name}" is not a readable image (not {", ".join(FORMATS[:-1])} or '
                                      f"{FORMATS[-1]}, or its header is corrupt)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt data
        raise BriefError(file, field, f'"{name}" is not a readable image (truncated or corrupt: '
                                      f"{type(exc).__name__})") from None
    if min(converted.size) < 1:
        raise BriefError(file, field, f'"{name}" has no pixels ({converted.size[0]}x{converted.size[1]})')
    return InputImage(field, path, hashlib.sha256(data).hexdigest(), converted.size, mode, frames)


def reread(file: str, image: InputImage) -> bytes:
    """The bytes of a checked image, read again at run time; the same kind of error line if it is gone or changed."""
    data = _read(file, image.field, image.path)
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise BriefError(file, image.field, f'"{image.path.name}" changed after the brief was checked; '
                                            "run the brief again")
    return data
