"""The YAML brief: parsed once, at the edge, into frozen typed objects.

``load_brief(path)`` is the only entry point. It reads the file with a strict YAML loader (``_load_yaml``:
no duplicate keys, keys are text, no alias that expands past ``MAX_YAML_NODES``), validates it with pydantic
in strict mode (unknown keys, ranges, and no type coercion: ``drafts: true`` is not 1, ``seed: "12"`` is not
12), then checks the file system (reference images and masks exist, stay inside the brief's folder, and
decode in full: ``atelier.inputs.check_image``). Any problem raises ``BriefError`` naming the file and the
field, e.g. ``campaigns/x.yaml: deliverables[1].aspect: expected W:H like 16:9``.
"""

from __future__ import annotations

import glob
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from atelier.errors import BriefError

if TYPE_CHECKING:
    from atelier.inputs import InputImage
    from atelier.profiles import Profile

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
MAX_SIDE = 8192  # px; larger finals are almost surely a typo (and take GBs of RAM to upscale)
MIN_SIDE = 64
MAX_DRAFTS = 64
SIZE_PRESETS = {"4k": 3840, "2k": 2048, "1080p": 1920}  # long side in px at the deliverable's aspect
MAX_REFS = 200  # reference images after expanding globs; each is decoded at validation and embedded by CLIP
MAX_BRIEF_BYTES = 2**20  # a long brief is a few KB
MAX_YAML_NODES = 100_000  # values after expanding aliases (a 50-deliverable brief has ~2,000): no billion laughs
MAX_YAML_DEPTH = 32  # nesting levels; a brief uses 6


def _path_text(value: str) -> str:
    if not value or len(value) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"expected a file path (1-1024 characters, no control characters), got {value!r}")
    return value


PathText = Annotated[str, AfterValidator(_path_text)]  # a file path or glob relative to the brief's folder


class _Strict(BaseModel):
    # strict: a value of the wrong YAML type is an error, never converted (lists arrive as tuples: see _freeze)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Brand(_Strict):
    style_refs: tuple[PathText, ...] = Field(min_length=1)
    negative: str = ""


class Inpaint(_Strict):
    prompt: str
    region: tuple[float, float, float, float] | None = None  # x, y, w, h as fractions of the image
    shape: Literal["rect", "ellipse"] = "rect"  # of the region
    mask: PathText | None = None  # image path relative to the brief's folder; white = repaint
    faces: bool = False  # repaint the faces OpenCV finds in each image

    @model_validator(mode="after")
    def _one_source(self) -> Inpaint:
        if sum([self.region is not None, self.mask is not None, self.faces]) != 1:
            raise ValueError("give exactly one of region: [x, y, w, h], mask: PATH or faces: true")
        return self

    @field_validator("region")
    @classmethod
    def _inside(cls, region: Any):
        if region is None:
            return region
        x, y, w, h = region
        if not (0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 and 0 < h <= 1):
            raise ValueError(f"region values must be fractions: 0 <= x, y < 1 and 0 < w, h <= 1, got {list(region)}")
        if x + w > 1 + 1e-9 or y + h > 1 + 1e-9:
            raise ValueError(f"region {list(region)} reaches outside the image (x + w and y + h must be <= 1)")
        return region


class Post(_Strict):
    inpaint: Inpaint | None = None
    face_restore: bool = False
    # a restored face farther than this from the original (dlib identity distance) is not used; None: the profile's
    identity_threshold: float | None = Field(default=None, gt=0, le=2)
    upscale: bool = False


class LoraRef(_Strict):
    source: PathText  # a .safetensors file or folder relative to the brief's folder, or a Hugging Face id
    scale: float = Field(default=1.0, ge=-4, le=4)
    weight_name: str = ""


class StageOverride(_Strict):
    """Per-stage settings that replace the profile's (all optional)."""

    steps: int | None = Field(default=None, ge=1, le=200)
    guidance: float | None = Field(default=None, ge=0, le=30)
    scheduler: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    loras: tuple[LoraRef, ...] = ()

    @field_validator("scheduler")
    @classmethod
    def _known(cls, value: Any):
        from atelier.profiles import SCHEDULERS

        if value is not None and value not in SCHEDULERS:
            raise ValueError(f'unknown scheduler "{value}"; known: {", ".join(SCHEDULERS)}')
        return value


class Stages(_Strict):
    draft: StageOverride = StageOverride()
    refine: StageOverride = StageOverride()
    inpaint: StageOverride = StageOverride()
    ip_adapter_scale: float | None = Field(default=None, ge=0, le=2)


VARY = {"subtle": 0.5, "strong": 0.85}  # img2img strength of a variation round (Fooocus' Vary Subtle / Strong)
MAX_ROUNDS = 8


class Round(_Strict):
    """One more round after the first selection: variations of the previous round's kept images."""

    vary: str | float = "subtle"  # subtle | strong | an img2img strength in (0, 1]
    drafts: int = Field(default=4, ge=1, le=MAX_DRAFTS)  # variations per kept image
    keep: int = Field(default=2, ge=1, le=MAX_DRAFTS)
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None  # replaces the prompt
    prompt_append: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None  # appended

    @field_validator("vary", mode="before")
    @classmethod
    def _vary(cls, value: Any):
        if isinstance(value, str) and value.strip().lower() in VARY:
            return value.strip().lower()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected subtle, strong or a strength in (0, 1], got {_shown(value)}")
        strength = float(value)
        if not 0 < strength <= 1:
            raise ValueError(f"a strength must be in (0, 1], got {strength}")
        return strength

    @property
    def strength(self) -> float:
        return VARY[self.vary] if isinstance(self.vary, str) else float(self.vary)


ReviewWhen = Literal["every", "last"]


def _review_value(value: Any) -> Any:
    """``review:`` true (a person decides after every selection), "last" (only before refine), false (CLIP)."""
    if value is True:
        return "every"
    if value is False or value is None or value in ("every", "last"):
        return value
    raise ValueError(f"expected true (every selection), last or false, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A YAML value as a person wrote it, for an error line (short, one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f'the text "{value if len(value) <= 40 else value[:37] + "..."}"'
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__} ({str(value)[:40]})"


class Deliverable(_Strict):
    name: Name
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    negative: str = ""
    aspect: str = "1:1"
    drafts: int = Field(default=8, ge=1, le=MAX_DRAFTS)
    keep: int = Field(default=2, ge=1, le=MAX_DRAFTS)
    size: str = "1080p"
    post: Post = Post()
    rounds: tuple[Round, ...] | None = Field(default=None, max_length=MAX_ROUNDS)  # None: the campaign's
    review: ReviewWhen | Literal[False] | None = None  # None: the campaign's

    @field_validator("review", mode="before")
    @classmethod
    def _review(cls, value: Any):
        return _review_value(value)

    @field_validator("aspect", mode="before")
    @classmethod
    def _aspect_quoted(cls, value: Any):
        if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 16:9 as 16 * 60 + 9
            raise ValueError(f'expected W:H like 16:9 in quotes ("16:9"); YAML reads it unquoted as the number {value}')
        return value

    @field_validator("aspect")
    @classmethod
    def _aspect(cls, value: str) -> str:
        m = re.fullmatch(r"\s*(\d{1,3})\s*:\s*(\d{1,3})\s*", value)
        if not m or int(m[1]) == 0 or int(m[2]) == 0:
            raise ValueError(f'expected W:H like 16:9, got "{value}"')
        ratio = int(m[1]) / int(m[2])
        if not 0.25 <= ratio <= 4:
            raise ValueError(f'aspect ratio must be between 1:4 and 4:1, got "{value}"')
        return f"{int(m[1])}:{int(m[2])}"

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        value = value.strip().lower()
        if value in SIZE_PRESETS:
            return value
        m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value)
        if not m:
            raise ValueError(f'expected 4k, 2k, 1080p or WxH like 1920x1080, got "{value}"')
        w, h = int(m[1]), int(m[2])
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise ValueError(f"each side must be between {MIN_SIDE} and {MAX_SIDE} px, got {w}x{h}")
        return value

    @model_validator(mode="after")
    def _keep(self) -> Deliverable:
        if self.keep > self.drafts:
            raise ValueError(f"keep ({self.keep}) must be <= drafts ({self.drafts})")
        return self

    def prompt_at(self, rounds: tuple[Round, ...], n: int) -> str:
        """The prompt of round ``n`` (0: the first drafts): each round may replace or extend the one before."""
        prompt = self.prompt
        for r in rounds[:n]:
            if r.prompt is not None:
                prompt = r.prompt
            if r.prompt_append is not None:
                prompt = f"{prompt}, {r.prompt_append}"
        return prompt

    @property
    def aspect_ratio(self) -> float:
        w, h = self.aspect.split(":")
        return int(w) / int(h)

    def final_size(self) -> tuple[int, int]:
        """Delivered (width, height): presets fix the long side at the deliverable's aspect."""
        if self.size in SIZE_PRESETS:
            long_side = SIZE_PRESETS[self.size]
            r = self.aspect_ratio
            w, h = (long_side, long_side / r) if r >= 1 else (long_side * r, long_side)
            return int(round(w / 8) * 8), int(round(h / 8) * 8)
        w, h = self.size.split("x")
        return int(w), int(h)


class Budget(_Strict):
    """``budget: {usd: 20}``: what one run may spend on hosted backends (see ``flows.tasks._budget``)."""

    usd: float = Field(gt=0, le=1_000_000, allow_inf_nan=False)


class Safety(_Strict):
    """``safety: block | flag | off`` or ``{mode: block, threshold: 0.5}``: the open_nsfw gate (``atelier.safety``).
    Drafts at or above the threshold are never selected (block and flag); finals at or above it are not exported
    (block) or exported and marked (flag)."""

    mode: Literal["block", "flag", "off"] = "block"
    threshold: float | None = Field(default=None, gt=0, lt=1)  # None: the profile's


class Brief(_Strict):
    campaign: Name
    profile: str = "tiny"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    brand: Brand
    deliverables: tuple[Deliverable, ...] = Field(min_length=1, max_length=50)
    max_style_refs: int = Field(default=4, ge=1, le=16)  # the mood board keeps the N most central refs
    stages: Stages = Stages()  # optional per-stage overrides of the profile (steps, guidance, LoRAs...)
    rounds: tuple[Round, ...] = Field(default=(), max_length=MAX_ROUNDS)  # default rounds of every deliverable
    review: ReviewWhen | Literal[False] = False  # default review gate of every deliverable
    budget: Budget | None = None  # dollars a run may spend on hosted backends; None: no limit
    safety: Safety = Safety()  # the safety gate on drafts and finals; default: block

    @field_validator("safety", mode="before")
    @classmethod
    def _safety(cls, value: Any):
        if value is False:  # YAML 1.1 reads a bare `off` as false
            return {"mode": "off"}
        if isinstance(value, str):
            return {"mode": value.strip().lower()}
        return value

    @field_validator("review", mode="before")
    @classmethod
    def _review(cls, value: Any):
        return _review_value(value)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{usd: 20}} (US dollars a run may spend), got {value!r}")
        return value

    def rounds_of(self, d: Deliverable) -> tuple[Round, ...]:
        return self.rounds if d.rounds is None else d.rounds

    def review_of(self, d: Deliverable, override: bool | None = None) -> str | None:
        """When a person decides for ``d``: "every" selection, the "last" one, or None (CLIP decides).
        ``override`` (``atelier run --review``) turns review on at every selection for all deliverables."""
        if override:
            return "every"
        value = self.review if d.review is None else d.review
        return value or None

    def reviewed_at(self, d: Deliverable, n: int, override: bool | None = None) -> bool:
        """Whether the selection of round ``n`` waits for a person."""
        when = self.review_of(d, override)
        return when == "every" or (when == "last" and n == len(self.rounds_of(d)))

    @field_validator("deliverables")
    @classmethod
    def _unique(cls, items: Any):
        seen: set[str] = set()
        for i, d in enumerate(items):
            if d.name in seen:
                raise ValueError(f'duplicate deliverable name "{d.name}" (deliverables[{i}])')
            seen.add(d.name)
        return items


def _check_rounds(file: str, brief: Brief) -> None:
    """Each round keeps at most what it makes: ``keep <= (images kept by the round before) x drafts``."""
    for i, d in enumerate(brief.deliverables):
        rounds = brief.rounds_of(d)
        where = f"deliverables[{i}].rounds" if d.rounds is not None else "rounds"
        kept = d.keep
        for n, r in enumerate(rounds):
            if r.keep > kept * r.drafts:
                raise BriefError(file, f"{where}[{n}].keep", f"keep ({r.keep}) must be <= the {kept} image(s) kept "
                                                             f"before x drafts ({r.drafts}) = {kept * r.drafts}"
                                                             + (f" (deliverable {d.name})" if where == "rounds" else ""))
            kept = r.keep


@dataclass(frozen=True)
class Campaign:
    """A validated brief plus what the file system told us: resolved paths and the brief's hash."""

    path: Path
    brief: Brief
    style_refs: tuple[Path, ...]
    masks: tuple[tuple[str, Path], ...]  # (deliverable name, mask file)
    sha256: str
    images: tuple[InputImage, ...] = ()  # every checked reference and mask, with its field and sha256
    file: str = ""  # the brief's path as given, for error lines

    @property
    def root(self) -> Path:
        return self.path.parent

    def mask_for(self, deliverable: str) -> Path | None:
        return dict(self.masks).get(deliverable)

    def image(self, path: Path) -> InputImage:
        """What ``load_brief`` found about the reference or mask file ``path``."""
        for im in self.images:
            if im.path == path:
                return im
        raise KeyError(f"{path} is not a reference or mask of {self.path}")

    def read_image(self, path: Path) -> bytes:
        """The bytes of a reference or mask, read again at run time: ``BriefError`` if it is gone or changed."""
        from atelier.inputs import reread

        return reread(self.file or str(self.path), self.image(path))

    def profile(self, name: str | None = None) -> Profile:
        """The brief's model profile (or ``name``) with the brief's stage overrides applied."""
        return apply_overrides(name or self.brief.profile, self.brief.stages, self.root)


def _lora_source(root: Path, source: str) -> str:
    local = root / source
    return str(local.resolve()) if local.exists() else source


def apply_overrides(profile_name: str, stages: Stages, root: Path) -> Profile:
    """A copy of the named profile with the brief's per-stage settings and extra LoRAs."""
    import hashlib
    from dataclasses import replace

    from atelier.profiles import Lora, get_profile

    prof = get_profile(profile_name)
    changes: dict = {}
    for stage in ("draft", "refine", "inpaint"):
        o: StageOverride = getattr(stages, stage)
        fields = {k: getattr(o, k) for k in ("steps", "guidance", "scheduler", "strength") if getattr(o, k) is not None}
        if fields:
            changes[stage] = replace(getattr(prof, stage), **fields)
    for stage, role in (("draft", "draft_model"), ("refine", "refine_model")):
        o = getattr(stages, stage)
        if o.loras:
            extra = tuple(Lora("brief-" + hashlib.sha256(lo.source.encode()).hexdigest()[:10],
                               _lora_source(root, lo.source), lo.weight_name, lo.scale) for lo in o.loras)
            changes[role] = replace(getattr(prof, role), loras=getattr(prof, role).loras + extra)
    if stages.ip_adapter_scale is not None:
        changes["ip_adapter_scale"] = stages.ip_adapter_scale
    return replace(prof, **changes) if changes else prof


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "tagged-union"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


# pydantic's error type -> what was expected, for a value of the wrong YAML type
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "text",
             "tuple_type": "a list", "model_type": "a mapping of keys", "dict_type": "a mapping of keys"}


def _first_error(file: str, err: ValidationError) -> BriefError:
    e = err.errors()[0]
    # drop pydantic's own parts (union members like "literal['every','last']"), never the user's unknown key
    tail = e["loc"][-1:] if e["type"] == "extra_forbidden" else ()
    loc = tuple(p for p in e["loc"][: len(e["loc"]) - len(tail)]
                if not (isinstance(p, str) and ("[" in p or "function" in p))) + tail
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "string_pattern_mismatch":
        msg = f"use letters, digits, - and _ only (1-64 characters), got {value!r}"
    elif e["type"] in _EXPECTED:
        msg = f"expected {_EXPECTED[e['type']]}, got {_shown(value)}"
        if isinstance(value, str) and e["type"] in ("int_type", "float_type", "bool_type"):
            msg += " (write it without quotes)" if _looks_typed(value) else ""
        elif e["type"] == "string_type" and isinstance(value, (bool, int, float, type(None))):
            msg += " (put it in quotes)"
    return BriefError(file, _loc(loc), msg)


def _looks_typed(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|true|false", text.strip(), re.IGNORECASE))


# ------------------------------------------------------------------------------------ strict YAML
_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


def _yaml_error(file: str, exc: yaml.YAMLError) -> BriefError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return BriefError(file, "", f"YAML syntax error: {where}{problem}")


def _check_node(file: str, node: yaml.Node, where: str, sizes: dict[int, int], open_: set[int], depth: int) -> int:
    """Refuse duplicate keys, keys that are not text, self-referring aliases and deep nesting; returns how many
    values ``node`` stands for once its aliases are expanded (aliases share nodes: ``sizes`` memoises them)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise BriefError(file, where, f"line {node.start_mark.line + 1}: an alias refers to the value that holds it")
    if depth > MAX_YAML_DEPTH:
        raise BriefError(file, where, f"nested more than {MAX_YAML_DEPTH} levels deep")
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if k.tag == _MERGE:  # `<<: *defaults`: its keys may be overridden here, by design
                size += _check_node(file, v, where, sizes, open_, depth + 1)
                continue
            if not isinstance(k, yaml.ScalarNode):
                kind = "list" if isinstance(k, yaml.SequenceNode) else "mapping"
                raise BriefError(file, where, f"line {line}: a key must be text, not a {kind}")
            if k.tag != _STR:
                kind = k.tag.rsplit(":", 1)[-1]
                kind = {"bool": "a boolean", "int": "a number", "float": "a number", "timestamp": "a date"}.get(kind, kind)
                raise BriefError(file, where, f'line {line}: the key {k.value!r} is read by YAML as {kind}; '
                                              f'quote it ("{k.value}") if it is meant')
            here = f"{where}.{k.value}" if where else k.value
            if k.value in seen:
                raise BriefError(file, here, f"duplicate key (lines {seen[k.value]} and {line})")
            seen[k.value] = line
            size += _check_node(file, v, here, sizes, open_, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            size += _check_node(file, v, f"{where}[{i}]", sizes, open_, depth + 1)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise BriefError(file, where, f"expands to more than {MAX_YAML_NODES:,} values (YAML anchors and aliases "
                                      "repeated inside each other?)")
    sizes[id(node)] = size
    return size


def _freeze(value: Any) -> Any:
    """YAML lists as tuples (the brief's types are frozen, and strict validation takes tuples as given)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _check_depth(file: str, text: bytes) -> None:
    """Stop at the first value nested deeper than ``MAX_YAML_DEPTH``, reading events lazily: PyYAML's scanner
    costs O(depth) a token (1 MB of "[" would take hours) and its composer recurses once a level."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise BriefError(file, "", f"line {event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} "
                                           "levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _load_yaml(file: str, text: bytes) -> Any:
    """``yaml.safe_load``, strictly: the node tree is checked (``_check_node``) before anything is built."""
    loader = None
    try:
        _check_depth(file, text)
        loader = yaml.SafeLoader(text)  # reads the encoding: a ReaderError on bytes that are not text
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(file, node, "", {}, set(), 0)
        return _freeze(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from None
    except RecursionError:
        raise BriefError(file, "", f"YAML nested too deeply (a brief needs {MAX_YAML_DEPTH} levels at most)") from None
    finally:
        if loader is not None:
            loader.dispose()


# ------------------------------------------------------------------------------------ files
def _resolve_inside(file: str, field: str, root: Path, pattern: str) -> list[Path]:
    """Expand a path or glob relative to ``root``; every match must stay inside ``root`` (symlinks resolved).
    A glob skips the folders it matches; a path is returned as it is (``check_image`` says what is wrong)."""
    if Path(pattern).is_absolute():
        raise BriefError(file, field, f'"{pattern}" must be relative to the brief\'s folder')
    try:
        if glob.has_magic(pattern):
            matches = [m for m in sorted(glob.glob(str(root / pattern), recursive=True)) if not Path(m).is_dir()]
        else:
            matches = [str(root / pattern)]
        if len(matches) > MAX_REFS:
            raise BriefError(file, field, f'"{pattern}" matches {len(matches)} files; at most {MAX_REFS}')
        if not matches:
            raise BriefError(file, field, f'"{pattern}" matches no file in {root}')
        root_real = root.resolve()
        out = []
        for m in matches:
            p = Path(m).resolve()
            if not p.is_relative_to(root_real):
                raise BriefError(file, field, f'"{pattern}" points outside the brief\'s folder')
            out.append(p)
        return out
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise BriefError(file, field, f'"{pattern}": cannot resolve ({getattr(exc, "strerror", None) or exc})') from None


def load_brief(path: str | Path, profile_names: tuple[str, ...] | None = None) -> Campaign:
    """Parse and fully validate a brief; raise ``BriefError`` on the first problem."""
    path = Path(path)
    file = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BRIEF_BYTES:
            raise BriefError(file, "", f"the brief is {size:,} bytes; a brief is at most {MAX_BRIEF_BYTES:,}")
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise BriefError(file, "", f"cannot read brief ({exc.strerror or exc})") from None
    data = _load_yaml(file, raw_bytes)
    if not isinstance(data, dict):
        raise BriefError(file, "", f"expected a mapping of keys (campaign, brand, deliverables...), got {type(data).__name__}")
    try:
        brief = Brief.model_validate(data)
    except ValidationError as err:
        raise _first_error(file, err) from None

    _check_rounds(file, brief)
    if profile_names is None:
        from atelier.profiles import PROFILES

        profile_names = tuple(PROFILES)
    if brief.profile not in profile_names:
        raise BriefError(file, "profile", f'unknown profile "{brief.profile}"; known: {", ".join(profile_names)}')

    from atelier.inputs import check_image  # Pillow and numpy: only once the YAML is good

    root = path.parent
    images: dict[Path, InputImage] = {}
    for i, pattern in enumerate(brief.brand.style_refs):
        field = f"brand.style_refs[{i}]"
        for p in _resolve_inside(file, field, root, pattern):
            if p not in images:
                images[p] = check_image(file, field, p)
        if len(images) > MAX_REFS:
            raise BriefError(file, field, f"{len(images)} reference images; at most {MAX_REFS}")
    refs = tuple(images)
    for stage in ("draft", "refine", "inpaint"):
        for i, lo in enumerate(getattr(brief.stages, stage).loras):
            field = f"stages.{stage}.loras[{i}].source"
            local = root / lo.source
            if local.exists():
                if not local.resolve().is_relative_to(root.resolve()):
                    raise BriefError(file, field, f'"{lo.source}" points outside the brief\'s folder')
            elif ".." in lo.source or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", lo.source):
                raise BriefError(file, field, f'"{lo.source}": no such file (give a path relative to the brief, '
                                              "or a Hugging Face id like org/name)")
    if brief.stages.inpaint.loras:
        raise BriefError(file, "stages.inpaint.loras", "LoRAs apply to draft and refine; inpaint uses the refine model's")
    masks, mask_images = [], []
    for i, d in enumerate(brief.deliverables):
        if d.post.inpaint is not None and d.post.inpaint.mask is not None:
            field = f"deliverables[{i}].post.inpaint.mask"
            if glob.has_magic(d.post.inpaint.mask):
                raise BriefError(file, field, f'"{d.post.inpaint.mask}": give one file, not a pattern')
            [p] = _resolve_inside(file, field, root, d.post.inpaint.mask)
            masks.append((d.name, p))
            mask_images.append(check_image(file, field, p, mask=True))
    return Campaign(path=path.resolve(), brief=brief, style_refs=refs, masks=tuple(masks),
                    sha256=hashlib.sha256(raw_bytes).hexdigest(), images=(*images.values(), *mask_images), file=file)


def fit_to_area(aspect: float, pixels: int, multiple: int) -> tuple[int, int]:
    """(width, height) with width/height ~= aspect, width*height ~= pixels, both multiples of ``multiple``."""
    h = math.sqrt(pixels / aspect)
    w = h * aspect
    return max(multiple, int(round(w / multiple)) * multiple), max(multiple, int(round(h / multiple)) * multiple)
