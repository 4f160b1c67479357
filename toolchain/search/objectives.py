"""What a search may optimise and constrain, the checks of those choices, and what a candidate's values mean
against the limits (pymoo's ``G <= 0`` and one summed violation). The errors a search raises live here too."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

METRICS = ("error", "latency", "memory", "params")
CONSTRAINT_METRICS = ("latency", "memory", "params")
UNITS = {"latency": "ms", "memory": "MB", "params": ""}
METHODS = ("nsga2", "random", "local")


class SearchError(ValueError):
    """A search that cannot run as asked, with a message for the user."""


class HistoryError(SearchError):
    """A ``search_history.csv`` that cannot be resumed from."""


class BudgetExhausted(Exception):
    """Raised by a :class:`~toolchain.search.candidates.CandidateStore` when a new candidate would exceed
    ``n_evals`` or ``max_seconds``."""


def check_objectives(objectives: Iterable[str]) -> tuple[str, ...]:
    """``objectives`` as a tuple of known, distinct metric names (a single name is accepted too)."""
    objectives = tuple(objectives) if not isinstance(objectives, str) else (objectives,)
    if not objectives:
        raise SearchError("choose at least one objective from: " + ", ".join(METRICS))
    bad = [o for o in objectives if o not in METRICS]
    if bad:
        raise SearchError(f"unknown objective(s) {', '.join(bad)}; choose from: {', '.join(METRICS)}")
    if len(set(objectives)) != len(objectives):
        raise SearchError(f"objective listed twice: {', '.join(objectives)}")
    return objectives


def check_constraints(constraints: Mapping[str, float | None] | None) -> dict[str, float]:
    """metric -> positive limit; ``None`` limits are dropped."""
    out: dict[str, float] = {}
    for name, limit in (constraints or {}).items():
        if limit is None:
            continue
        if name not in CONSTRAINT_METRICS:
            raise SearchError(f"unknown constraint '{name}'; constraints exist for: {', '.join(CONSTRAINT_METRICS)}")
        limit = float(limit)
        if not math.isfinite(limit) or limit <= 0:
            raise SearchError(f"--max-{name} must be a positive number, got {limit}")
        out[name] = limit
    return out


def violations(values: Mapping[str, float], constraints: Mapping[str, float]) -> np.ndarray:
    """pymoo inequality constraints G <= 0, relative to the limit: value / limit - 1."""
    return np.array([values[c] / limit - 1.0 for c, limit in constraints.items()], dtype=float)


def feasibility(values: Mapping[str, float], constraints: Mapping[str, float]) -> dict:
    """``{"feasible": ..., "violation": ...}``: the violation is the sum of the relative excesses over the limits."""
    violation = float(np.maximum(violations(values, constraints), 0.0).sum())
    return {"feasible": violation == 0.0, "violation": violation}
