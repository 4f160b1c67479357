"""Pareto fronts of evaluated records (dicts of metric values): the non-dominated ones (pymoo's sorting), the
constrained front a search keeps improving, the best point under a budget, and the summary of a search (front,
knee, hypervolume)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from toolchain.core.pareto import non_dominated
from toolchain.search.hypervolume import hypervolume, knee_index, normalise


def best_under(points: Iterable[Mapping], budget: float, *, cost: str = "latency", score: str = "error"):
    """The point with the lowest ``score`` among those whose ``cost`` is within ``budget`` (ties: the cheaper);
    ``None`` when none fits."""
    fits = [p for p in points if p[cost] <= budget]
    return min(fits, key=lambda p: (p[score], p[cost])) if fits else None


def constrained_front(records: list[dict], objectives: Sequence[str]) -> list[dict]:
    """Constrained Pareto front of ``records``: non-dominated feasible ones, or the least-violating if none."""
    feasible = [r for r in records if r["feasible"]]
    if feasible:
        pool = feasible
    else:
        least = min(r["violation"] for r in records)
        pool = [r for r in records if r["violation"] == least]
    return non_dominated(pool, objectives)


def front_order(objectives: Sequence[str]):
    """Sort key of a front: by the cost objectives, then the error, then the order they were evaluated in."""
    order = [o for o in objectives if o != "error"] + [o for o in objectives if o == "error"]
    return lambda r: (*(r[o] for o in order), r["index"])


def summarize(records: list[dict], objectives: Sequence[str], normalizers: Mapping[str, float]):
    """(pareto records sorted by the first non-error objective, knee record, hypervolume) of ``records``."""
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
        return [], None, 0.0
    pareto = sorted(non_dominated(feasible, objectives), key=front_order(objectives))
    PF = np.array([[r[o] for o in objectives] for r in pareto], dtype=float)
    k = knee_index(normalise(PF, objectives, normalizers))
    return pareto, (pareto[k] if k is not None else None), hypervolume(PF, objectives, normalizers)
