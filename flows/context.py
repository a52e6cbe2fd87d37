"""The run context: what a run's tasks share, built once per run in each process that runs them.

``RunSpec`` is the run as data (ids, paths, the brief's overrides, ``--force``): what a flow is called with.
``RunContext`` adds what is live in this process: the open store, the model cache view, the progress sink,
and the run's counters (model calls, CUDA out-of-memory batch caps, phase seconds). Tasks take the
context as an argument; nothing here is module-level. Sent to another process (a Dask worker), a
context travels as its spec and is rebuilt there with that process's model cache and a silent reporter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from atelier.brief import Stages, apply_overrides
from atelier.models import ModelCache, Models, process_cache
from atelier.profiles import Profile
from atelier.progress import NullReporter, Reporter
from flows import STAGES
from store import Store, open_store


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    home: str
    profile: str
    store_url: str | None = None
    assets_url: str | None = None  # fsspec URL of the asset files; None: $ATELIER_ASSETS, else <home>/assets
    stages: Stages = Stages()  # the brief's per-stage overrides of the profile
    brief_root: str = "."
    force: str | None = None  # recompute this stage and every later one even where the assets are stored
    review: bool = False  # ``atelier run --review``: a person decides at every selection of every deliverable


@dataclass
class ModelCalls:
    """Stage entry functions this process called for the run (an unchanged re-run makes none)."""

    count: int = 0
    seconds: float = 0.0
    by_stage: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"count": self.count, "seconds": round(self.seconds, 4), "by_stage": dict(self.by_stage)}


class RunContext:
    """One run, in one process. Build it with ``RunContext(spec)``; pass it to tasks."""

    def __init__(self, spec: RunSpec, progress: Reporter | None = None, cache: ModelCache | None = None) -> None:
        self.spec = spec
        self.store: Store = open_store(Path(spec.home), spec.store_url, spec.assets_url)
        self.models = Models(Path(spec.home) / "models", cache or process_cache())
        self.progress: Reporter = progress or NullReporter()
        # The profile as this brief runs it: the named profile, with the brief's stage overrides applied.
        self.prof: Profile = apply_overrides(spec.profile, spec.stages, Path(spec.brief_root))
        self.calls = ModelCalls()
        self.batch_caps: dict[tuple[str | None, str], int] = {}  # (deliverable, stage) -> batch after CUDA OOM
        self.phases: Counter = Counter()  # seconds spent exporting finals and publishing artifacts

    def __reduce__(self):  # noqa: ANN204 - pickled as its spec: live resources are rebuilt where it lands
        return (RunContext, (self.spec,))

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def home(self) -> Path:
        return Path(self.spec.home)

    def forced(self, stage: str) -> bool:
        """Whether ``--force`` makes ``stage`` recompute its stored assets (masks go with inpaint)."""
        stage = {"mask": "inpaint", "select-decision": "select", "pick": "select"}.get(stage, stage)
        force = self.spec.force
        return force is not None and stage in STAGES and STAGES.index(stage) >= STAGES.index(force)
