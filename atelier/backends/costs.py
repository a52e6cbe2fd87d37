"""Dollars of a run, from what its assets recorded: per asset, per stage, per deliverable, and the saving of
drafting cheap before finishing. Pure functions over plain rows, for the report to call.

A remote asset records ``params["remote"]["usd"]`` (the price table's estimate when it was made). A run pays
only for the assets it computed: a reused asset costs $0 (its price is shown as what reuse saved). A remote
asset with no price table counts as *unknown*, never as $0; a local asset costs no API dollars.
A budget check (``over_budget``) compares what a run has spent plus the next request's estimate to a limit.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CostRow:
    key: str
    stage: str
    deliverable: str | None
    params: dict
    computed: bool  # made by this run (False: reused from the store)


def asset_usd(params: dict) -> tuple[float | None, bool]:
    """(dollars, is it remote) of one asset from its recorded params: (0.0, False) for a local asset."""
    remote = params.get("remote")
    if not isinstance(remote, dict):
        return 0.0, False
    usd = remote.get("usd")
    return (float(usd) if usd is not None else None), True


def summarize(rows: Iterable[CostRow]) -> dict:
    """The run's dollars: total spent, by stage and deliverable, unknown-priced assets, saved by reuse, and per
    deliverable the saving of drafting cheap (what finishing every draft at the refine price would have cost,
    minus drafts + refines as made)."""
    spent, saved, unknown = 0.0, 0.0, 0
    by_stage: dict[str, float] = defaultdict(float)
    by_deliverable: dict[str, float] = defaultdict(float)
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_asset = {}
    for row in rows:
        usd, remote = asset_usd(row.params)
        if not remote:
            continue
        per_asset[row.key] = usd
        if usd is None:
            unknown += 1
            continue
        name = row.deliverable or "campaign"
        per[name][row.stage].append(usd)
        if row.computed:
            spent += usd
            by_stage[row.stage] += usd
            by_deliverable[name] += usd
        else:
            saved += usd
    drafting = {}
    for name, stages in per.items():
        drafts, refines = stages.get("draft", []), stages.get("refine", [])
        if drafts and refines:
            unit = sum(refines) / len(refines)
            made = sum(drafts) + sum(refines)
            drafting[name] = {"as_made": round(made, 6), "all_at_refine_price": round(unit * len(drafts), 6),
                              "saving": round(unit * len(drafts) - made, 6)}
    return {"usd": round(spent, 6), "saved_by_reuse": round(saved, 6), "unknown_priced": unknown,
            "by_stage": {k: round(v, 6) for k, v in by_stage.items()},
            "by_deliverable": {k: round(v, 6) for k, v in by_deliverable.items()},
            "drafting_saving": drafting, "per_asset": per_asset}


def over_budget(limit_usd: float, spent_usd: float, estimate_usd: float | None) -> str | None:
    """Why the next request must not start (one line), or None when it fits. An unknown estimate never
    fits a budget: a run with a budget needs a price table for every backend it calls."""
    if estimate_usd is None:
        return f"budget ${limit_usd:.2f}: the next request has no price table, so it cannot be kept within it"
    if spent_usd + estimate_usd > limit_usd + 1e-9:
        return (f"budget ${limit_usd:.2f}: ${spent_usd:.2f} spent, the next request (~${estimate_usd:.3f}) would "
                "exceed it; raise budget.usd and run again to continue")
    return None


class Budget:
    """A run's spending limit, shared by its requests in flight: ``reserve`` each request's estimate before
    sending it; the first that would exceed the limit raises a ``BackendError`` of kind ``budget`` (nothing
    is sent, nothing half-made is recorded; a re-run with a higher limit reuses what was made and goes on)."""

    def __init__(self, limit_usd: float, spent_usd: float = 0.0) -> None:
        self.limit_usd, self.spent_usd = float(limit_usd), float(spent_usd)
        self._lock = threading.Lock()

    def reserve(self, estimate_usd: float | None, source: str = "budget") -> None:
        from atelier.backends.common import BackendError

        with self._lock:
            why = over_budget(self.limit_usd, self.spent_usd, estimate_usd)
            if why:
                backend, _, model = source.partition(":")
                raise BackendError(backend, model or "*", "budget", why)
            self.spent_usd += estimate_usd or 0.0
