"""Pareto fronts of evaluated records (dicts of metric values): the non-dominated ones (pymoo's sorting), the
constrained front a search keeps improving, the best point under a budget, and the summary of a search (front,
knee, hypervolume)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from toolchain.search.hypervolume import hypervolume, knee_index, normalise


def non_dominated(points: Sequence[Mapping], objectives: Sequence[str]) -> list:
    """The points not dominated in ``objectives`` (all minimised; pymoo's non-dominated sorting), in input order."""
    if not points:
        return []
    F = np.array([[p[o] for o in objectives] for p in points], dtype=float)
    keep = set(np.atleast_1d(NonDominatedSorting().do(F, only_non_dominated_front=True)).tolist())
    return [p for i, p in enumerate(points) if i in keep]


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


def _sort_key(objectives: Sequence[str]):
    order = [o for o in objectives if o != "error"] + [o for o in objectives if o == "error"]
    return lambda r: (*(r[o] for o in order), r["index"])


def summarize(records: list[dict], objectives: Sequence[str], normalizers: Mapping[str, float]):
    """(pareto records sorted by the first non-error objective, knee record, hypervolume) of ``records``."""
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
        return [], None, 0.0
    pareto = sorted(non_dominated(feasible, objectives), key=_sort_key(objectives))
    PF = np.array([[r[o] for o in objectives] for r in pareto], dtype=float)
    k = knee_index(normalise(PF, objectives, normalizers))
    return pareto, (pareto[k] if k is not None else None), hypervolume(PF, objectives, normalizers)
