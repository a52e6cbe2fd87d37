"""Dollars of a run, from what its assets recorded: per asset, per stage, per deliverable, and the saving of
drafting cheap before finishing. Pure functions over plain rows, for the report to call.

A remote asset records ``params["remote"]["usd"]`` (the price table's estimate when it was made). A run pays
only for the assets it computed: a reused asset costs $0 (its price is shown as what reuse saved). A remote
asset with no price table counts as *unknown*, never as $0; a local asset costs no API dollars.
A budget check (``over_budget``) compares what a run has spent plus the next requests' estimate to a limit.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CostRow:
    key: str
    stage: str
    deliverable: str | None
    params: dict
    computed: bool  # made by this run (False: reused from the store)


def cost_rows(members: Iterable[tuple[Any, Any]]) -> list[CostRow]:
    """One row per asset of a run, from its ``(RunAsset, Asset)`` pairs (``store.queries.run_assets``)."""
    return [CostRow(a.key, a.stage, a.deliverable, a.params or {}, ra.status == "computed") for ra, a in members]


def asset_usd(params: dict) -> tuple[float | None, bool]:
    """(dollars, is it remote) of one asset from its recorded params: (0.0, False) for a local asset."""
    remote = params.get("remote")
    if not isinstance(remote, dict):
        return 0.0, False
    usd = remote.get("usd")
    return (float(usd) if usd is not None else None), True


def summarize(rows: Iterable[CostRow]) -> dict:
    """The run's dollars: total spent, by stage and deliverable (and both), unknown-priced assets, saved by
    reuse (in all and per deliverable), and per deliverable the saving of drafting cheap (what finishing every
    candidate, drafts and variations, at the refine price would have cost, minus candidates + refines as made)."""
    spent, saved, unknown = 0.0, 0.0, 0
    by_stage: dict[str, float] = defaultdict(float)
    by_deliverable: dict[str, float] = defaultdict(float)
    by_both: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    saved_by: dict[str, float] = defaultdict(float)
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
            by_both[name][row.stage] += usd
        else:
            saved += usd
            saved_by[name] += usd
    drafting = {}
    for name, stages in per.items():
        drafts, refines = stages.get("draft", []) + stages.get("vary", []), stages.get("refine", [])
        if drafts and refines:
            unit = sum(refines) / len(refines)
            made = sum(drafts) + sum(refines)
            drafting[name] = {"as_made": round(made, 6), "all_at_refine_price": round(unit * len(drafts), 6),
                              "saving": round(unit * len(drafts) - made, 6)}

    def r6(d: dict) -> dict:
        return {k: round(v, 6) for k, v in d.items()}

    return {"usd": round(spent, 6), "saved_by_reuse": round(saved, 6), "unknown_priced": unknown,
            "by_stage": r6(by_stage), "by_deliverable": r6(by_deliverable),
            "by_deliverable_stage": {k: r6(v) for k, v in by_both.items()}, "saved_by_deliverable": r6(saved_by),
            "drafting_saving": drafting, "per_asset": per_asset}


def money(usd: float | None) -> str:
    """Dollars as a report shows them: ``$0``, ``$0.003``, ``$0.0065``, ``$0.05``, ``$20.00``; None is ``?``."""
    if usd is None:
        return "?"
    if usd == 0:
        return "$0"
    if abs(usd) >= 1:
        return f"${usd:,.2f}"
    if abs(usd) < 0.00005:  # below what 4 decimals show: up to 8
        return "$" + f"{usd:.8f}".rstrip("0")
    text = f"{usd:.4f}".rstrip("0")
    return "$" + (text + "0" if len(text.partition(".")[2]) < 2 else text)


def over_budget(limit_usd: float, spent_usd: float, estimate_usd: float | None, requests: int = 1) -> str | None:
    """Why the next ``requests`` must not start (one line), or None when they fit. An unknown estimate never
    fits a budget: a run with a budget needs a price table for every backend it calls."""
    what = "the next request" if requests == 1 else f"the next {requests} requests"
    if estimate_usd is None:
        return f"budget {money(limit_usd)}: {what} has no price table, so it cannot be kept within it"
    if spent_usd + estimate_usd > limit_usd + 1e-9:
        return (f"budget {money(limit_usd)}: {money(spent_usd)} spent, {what} (~{money(estimate_usd)}) would "
                "exceed it; raise budget.usd and run again to continue")
    return None


class Budget:
    """A run's spending limit, shared by its requests: ``reserve`` the estimates of a stage's requests before
    sending any of them; when they would exceed the limit it raises a ``BackendError`` of kind ``budget`` and
    nothing is sent (so nothing is paid for that could not be recorded). A re-run with a higher limit reuses
    what was made ($0) and goes on."""

    def __init__(self, limit_usd: float, spent_usd: float = 0.0) -> None:
        self.limit_usd, self.spent_usd = float(limit_usd), float(spent_usd)
        self._lock = threading.Lock()

    def __reduce__(self):  # noqa: ANN204 - a lock does not pickle: a copy starts with its own
        return (Budget, (self.limit_usd, self.spent_usd))

    def __repr__(self) -> str:
        return f"Budget({money(self.limit_usd)}, spent {money(self.spent_usd)})"

    def reserve(self, estimate_usd: float | None, source: str = "budget") -> None:
        """Reserve one request's estimate."""
        self.reserve_all([estimate_usd], source)

    def reserve_all(self, estimates: list[float | None], source: str = "budget") -> None:
        """Reserve every estimate at once, or none of them."""
        from atelier.backends.common import BackendError

        unknown = any(e is None for e in estimates)
        total = None if unknown else sum(estimates)
        with self._lock:
            why = over_budget(self.limit_usd, self.spent_usd, total, len(estimates))
            if why:
                backend, _, model = source.partition(":")
                raise BackendError(backend, model or "*", "budget", why)
            self.spent_usd += total or 0.0
