"""The recipe travels with the file: what atelier writes into every image it makes, and reads back.

One *lineage document* per asset, carried three ways:
- PNG (every image asset): an ``atelier`` text chunk with the document as compact JSON, and a
  ``parameters`` chunk in the AUTOMATIC1111 infotext format, so A1111 / Forge / ComfyUI readers show
  prompt, seed, sampler and model;
- JPEG / WebP deliveries (``write_delivery``): the A1111 text in EXIF UserComment (where A1111 writes
  and reads it for those formats), the document in XMP;
- a ``<file>.json`` sidecar beside every delivered file: the same document.

The document holds the asset's key, its recipe (stage, params, model identity), its parents with their
roles, and the records of every ancestor down to the reference images, so ``atelier lineage FILE``
works on a copy with no database. Nothing about a run goes in (no run id, timings or paths): the
store dedupes by key, so an asset's bytes must depend on its recipe only.

A document (``FORMAT``)::

    {"format": "atelier-lineage/1", "key": "...", "stage": "upscale", "kind": "image",
     "campaign": "...", "deliverable": "hero", "width": 3840, "height": 2160,
     "params": {...}, "model": {...}, "parents": [["<key>", "source"]],
     "ancestors": {"<key>": {"stage": ..., "params": ..., "model": ..., "parents": [...], ...}}}
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from PIL import ExifTags, Image, UnidentifiedImageError

FORMAT = "atelier-lineage/1"
XMP_NS = "https://atelier.invalid/ns/lineage/1.0/"  # .invalid: a name that never resolves, by RFC 2606
GENERATIVE = ("draft", "refine", "inpaint")  # stages that sample from a prompt and a seed
CARRIED = ("select", "face_restore", "upscale")  # their image is their source's, as is or edited: same generation
DELIVERY_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_XMP_LIMIT = 65504  # one APP1 segment holds 65533 bytes, less the 29-byte XMP namespace header

# Our scheduler names -> A1111 (sampler, schedule type). A1111 >= 1.9 writes the schedule separately
# ("Sampler: DPM++ 2M, Schedule type: Karras") and still reads the older "DPM++ 2M Karras".
A1111_SAMPLERS = {
    "lcm": ("LCM", None),
    "euler": ("Euler", None),
    "euler-a": ("Euler a", None),
    "ddim": ("DDIM", None),
    "unipc": ("UniPC", None),
    "dpm++-2m-karras": ("DPM++ 2M", "Karras"),
    "flow-euler": ("Euler", "Simple"),  # as Forge writes its FLUX infotexts
}
A1111_FACE_RESTORERS = {"gfpgan": "GFPGAN", "codeformer": "CodeFormer"}


# ------------------------------------------------------------------------------------ the document
def record(stage: str, kind: str, campaign: str, deliverable: str | None, width: int | None, height: int | None,
           params: dict, model: dict | None, parents: Iterable[tuple[str, str]]) -> dict:
    """One asset's recipe as the document holds it; params / model normalised as the store's JSON columns hold them."""
    return {"stage": stage, "kind": kind, "campaign": campaign, "deliverable": deliverable, "width": width,
            "height": height, "params": _as_stored(params), "model": _as_stored(model),
            "parents": [[k, role] for k, role in parents]}


def lineage_doc(key: str, own: dict, ancestors: dict[str, dict]) -> dict:
    """The document of asset ``key``: its own ``record`` plus its ancestors' records by key."""
    return {"format": FORMAT, "key": key, **own, "ancestors": ancestors}


def ancestors(session: Any, keys: Iterable[str]) -> dict[str, dict]:
    """Records of ``keys`` and of all their ancestors, by key.

    Two queries whatever the depth: a recursive CTE collects every edge above ``keys``, then one
    ``IN`` fetches the rows. Ancestors are committed before a child is computed, so a key missing
    here is a broken store, not a race.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from store.schema import Asset, Edge

    keys = list(dict.fromkeys(keys))
    if not keys:
        return {}
    walk = (select(Edge.child, Edge.parent, Edge.role, Edge.position)
            .where(Edge.child.in_(keys)).cte("walk", recursive=True))
    up = aliased(Edge)
    walk = walk.union(select(up.child, up.parent, up.role, up.position).join(walk, up.child == walk.c.parent))
    parents: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for child, parent, role, position in session.execute(select(walk.c.child, walk.c.parent, walk.c.role,
                                                                 walk.c.position)):
        parents[child].append((position, parent, role))
    wanted = set(keys) | {parent for edges in parents.values() for _, parent, _ in edges}
    rows = {a.key: a for a in session.scalars(select(Asset).where(Asset.key.in_(wanted)))}
    if missing := wanted - rows.keys():
        raise LookupError(f"not in the lineage store: {', '.join(sorted(missing))}")
    return {k: record(a.stage, a.kind, a.campaign, a.deliverable, a.width, a.height, a.params, a.model,
                      [(parent, role) for _, parent, role in sorted(parents[k])])
            for k, a in rows.items()}


def doc_from_store(session: Any, key: str) -> dict:
    """The document of a stored asset, built from the store (what ``flows.tasks`` embedded at creation)."""
    chain = ancestors(session, [key])
    return lineage_doc(key, chain.pop(key), chain)


def dumps(doc: dict) -> str:
    """Canonical compact JSON: same document, same bytes. ASCII, so it fits a PNG tEXt chunk."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _as_stored(value: Any):
    return json.loads(json.dumps(value, default=str))  # what store.lineage.save writes to the JSON columns


def _records(doc: dict) -> dict[str, dict]:
    return {**(doc.get("ancestors") or {}), doc["key"]: doc}


# ------------------------------------------------------------------------------- A1111 infotext
def a1111_parameters(doc: dict) -> str | None:
    """The A1111 infotext of the generation this asset comes from, plus the post-edit steps since.

    Format of A1111 ``modules/processing.py::create_infotext``: the prompt, ``Negative prompt: ...``,
    then one line of ``Key: value`` pairs in A1111's order. Face restoration is written as A1111 writes
    its own GFPGAN pass; the upscale as its Extras tab does (``Postprocess upscale to``,
    ``Postprocess upscaler``), not as ``Hires upscaler``, which would mean a second diffusion pass.
    None for assets that are no generation's image (references, masks, the mood board).
    """
    # 1. Walk source / init parents back to the nearest generation, collecting the post-edits on the way.
    records, post, key = _records(doc), [], doc["key"]
    while (gen := records.get(key)) is not None and gen.get("stage") not in GENERATIVE:
        if gen.get("stage") not in CARRIED:  # a mask, a reference, the mood board: no generation of their own
            return None
        post.append(gen)
        key = next((k for k, role in gen.get("parents", []) if role in ("source", "init")), None)
        if len(post) > len(records):  # a cycle: only a corrupted (or forged) document has one
            return None
    if gen is None:
        return None
    # 2. The fields, in A1111's order; None is not written.
    p, model = gen.get("params") or {}, gen.get("model") or {}
    pipe = model.get("pipeline", model)
    sampler, schedule = A1111_SAMPLERS.get(p.get("scheduler"), (p.get("scheduler"), None))
    faces = [r for r in post if r["stage"] == "face_restore"]
    upscales = [r for r in reversed(post) if r["stage"] == "upscale"]  # oldest first; the last one wins
    face_model = (faces[0].get("model") or {}) if faces else {}
    face_model = face_model.get("face", face_model)  # with its detector and identity models: the restorer's
    fields = {
        "Steps": p.get("steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": p.get("guidance"),
        "Seed": p.get("seed"),
        "Face restoration": A1111_FACE_RESTORERS.get(face_model.get("kind"), face_model.get("name")) if faces else None,
        "Size": f"{gen['width']}x{gen['height']}" if gen.get("width") else None,
        "Model hash": (pipe.get("weights_sha256") or "")[:10] or None,  # A1111's short hash: sha256[:10]
        "Model": pipe.get("name"),
        "Denoising strength": p.get("strength") if gen["stage"] != "draft" else None,
        "Lora hashes": ", ".join(f"{lo['name']}: {(lo.get('weights_sha256') or '')[:12]}"
                                 for lo in pipe.get("loras") or []) or None,  # A1111: sha256[:12] per LoRA
        "IP-Adapter": (model.get("ip_adapter") or {}).get("name"),
        "IP-Adapter scale": p.get("ip_adapter_scale") if model.get("ip_adapter") else None,
    }
    for up in upscales:
        fields["Postprocess upscale to"] = f"{up['width']}x{up['height']}"
        fields["Postprocess upscaler"] = (up.get("model") or {}).get("name")
    line = ", ".join(f"{k}: {_quote(_number(v))}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {p['negative']}" if p.get("negative") else ""
    return f"{p.get('prompt', '')}{negative}\n{line}".strip()


def _number(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)  # 5.0 -> "5", 0.6 -> "0.6"
    return str(v)


def _quote(text: str) -> str:
    """A1111 ``infotext_utils.quote``: JSON-quote a value that holds a comma, colon or newline."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111(text: str) -> dict[str, str]:
    """Parse an A1111 infotext as A1111's ``infotext_utils.parse_generation_parameters`` does.

    Returns ``Prompt``, ``Negative prompt`` and every ``Key: value`` of the last line as strings
    (quoted values unquoted); ``WxH`` values split into ``Key-1`` / ``Key-2`` (``Size-1``, ``Size-2``).
    A1111's UI defaults for absent keys are not filled in.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111: fewer than three pairs means the last line is prompt too
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in _PARAM.findall(last):
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if m := _SIZE.match(v):
            out[f"{k}-1"], out[f"{k}-2"] = m.groups()
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------- writing
def png_text(doc: dict) -> dict[str, str]:
    """The PNG text chunks of an asset: ``parameters`` (when it has a generation) and ``atelier``."""
    params = a1111_parameters(doc)
    return ({"parameters": params} if params is not None else {}) | {"atelier": dumps(doc)}


def xmp_packet(doc: dict) -> bytes:
    """An XMP packet holding the document as the text of ``atelier:lineage``."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:atelier="{XMP_NS}"><atelier:lineage>{escape(dumps(doc))}'
        '</atelier:lineage></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
    ).encode()


def exif_user_comment(text: str) -> Image.Exif:
    """EXIF with ``text`` in UserComment as A1111 writes it (piexif: big-endian, ``UNICODE`` + UTF-16BE)."""
    exif = Image.Exif()  # a new Exif is big-endian ("MM"), like piexif's
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif


def sidecar_path(path: Path) -> Path:
    """``hero-1.png`` -> ``hero-1.png.json`` (one per delivered file, whatever its format)."""
    return path.with_name(path.name + ".json")


def write_sidecar(path: Path, doc: dict) -> Path:
    """Write the document beside ``path`` (indented: it is read by people too), atomically."""
    target = sidecar_path(Path(path))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_delivery(source: Path, target: Path, quality: int = 92, doc: dict | None = None) -> Path:
    """Write a JPEG or WebP copy of an atelier image (format from ``target``'s suffix), and its sidecar.

    The copy carries the A1111 text in EXIF UserComment and the lineage document in XMP. A JPEG holds
    at most 64 KB of XMP: a longer document is embedded without its ancestors (``"truncated": true``)
    and readers take the whole chain from the sidecar. ``doc`` defaults to the one ``source`` carries.
    """
    # 1. Check inputs
    source, target = Path(source), Path(target)
    fmt = DELIVERY_FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ValueError(f"{target}: unknown delivery format; known: {', '.join(DELIVERY_FORMATS)}")
    if doc is None:
        found = read_embedded(source)
        if found is None:
            raise ValueError(f"{source}: carries no atelier lineage to deliver")
        doc = found.doc
    # 2. The metadata
    xmp = xmp_packet(doc)
    if fmt == "JPEG" and len(xmp) > JPEG_XMP_LIMIT:
        xmp = xmp_packet({**{k: v for k, v in doc.items() if k != "ancestors"}, "truncated": True})
    params = a1111_parameters(doc)
    extra = {"exif": exif_user_comment(params)} if params is not None else {}
    # 3. Encode to a temp file, move it into place, then the sidecar
    with Image.open(source) as im:
        image = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    image.save(tmp, format=fmt, quality=quality, xmp=xmp, **extra)
    os.replace(tmp, target)
    write_sidecar(target, doc)
    return target


# ---------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Embedded:
    doc: dict
    carrier: str  # where it was found: "PNG text chunk", "XMP", "sidecar hero-1.png.json"


def read_embedded(path: Path) -> Embedded | None:
    """The lineage document ``path`` carries: its own metadata first, else its sidecar; None if neither.

    ``path`` may also be a sidecar itself. A truncated document (a JPEG too small for the chain)
    gives way to the sidecar when there is one. Anything malformed counts as absent.
    """
    path = Path(path)
    found = _from_file(path)
    if found is not None and not found.doc.get("truncated"):
        return found
    side = sidecar_path(path)
    if side.is_file() and (doc := _load_doc(_read_text(side))) is not None:
        return Embedded(doc, f"sidecar {side.name}")
    return found


def _from_file(path: Path) -> Embedded | None:
    try:
        with Image.open(path) as im:
            text = im.info.get("atelier")
            if text is None and im.format == "PNG":
                text = im.text.get("atelier")  # chunks after the image data (other writers put them there)
            if text is not None and (doc := _load_doc(text)) is not None:
                return Embedded(doc, "PNG text chunk")
            xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    except UnidentifiedImageError:  # not an image: maybe a sidecar given directly
        doc = _load_doc(_read_text(path))
        return Embedded(doc, f"sidecar {path.name}") if doc is not None else None
    except OSError:  # a damaged image
        return None
    if xmp and (doc := _doc_from_xmp(xmp)) is not None:
        return Embedded(doc, "XMP")
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _doc_from_xmp(xmp: bytes | str) -> dict | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xmp)
    except ET.ParseError:
        return None
    node = next(root.iter(f"{{{XMP_NS}}}lineage"), None)
    return _load_doc(node.text or "") if node is not None else None


def _load_doc(text: str) -> dict | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if _well_formed(doc) else None


def _well_formed(doc: Any) -> bool:
    """What readers rely on: a key, and per record a stage, [key, role] parents, dict params and model.

    Documents written before ``FORMAT`` existed (key, stage and parents only) pass: still a start.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
        return False
    ancestors = doc.get("ancestors", {})
    if not isinstance(ancestors, dict):
        return False
    for r in (doc, *ancestors.values()):
        if not (isinstance(r, dict) and isinstance(r.get("stage"), str) and isinstance(r.get("params", {}), dict)
                and isinstance(r.get("model"), (dict, type(None))) and isinstance(r.get("parents", []), list)):
            return False
        pairs = r.get("parents", [])
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            return False
    return True


def lineage_tree(doc: dict, max_depth: int = 32) -> dict:
    """The document as ``atelier.report.lineage_dict`` shapes a store walk (shared ancestors repeat).

    What only the store knows (file path and hash, run, timings) is None; an ancestor the document
    does not hold (a truncated one) shows as stage ``unknown``.
    """
    records = _records(doc)

    def walk(key: str, role: str | None, depth: int) -> dict:
        r = records.get(key, {})
        node = {"role": role, "key": key, "stage": r.get("stage", "unknown"), "campaign": r.get("campaign"),
                "deliverable": r.get("deliverable"),
                "path": None, "sha256": None, "width": r.get("width"), "height": r.get("height"), "seconds": None,
                "params": r.get("params") or {}, "model": r.get("model"), "run_id": None, "created_at": None,
                "parents": []}
        if depth < max_depth:
            node["parents"] = [walk(k, parent_role, depth + 1) for k, parent_role in r.get("parents", [])]
        return node

    return walk(doc["key"], None, 0)
