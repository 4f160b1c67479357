"""The one wrapper around pymoo's non-dominated sorting, for the search's records and the shipped points alike."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def non_dominated(points: Sequence[Mapping], objectives: Sequence[str]) -> list:
    """The points not dominated in ``objectives`` (all minimised; pymoo's non-dominated sorting), in input order."""
    if not points:
        return []
    F = np.array([[p[o] for o in objectives] for p in points], dtype=float)
    keep = set(np.atleast_1d(NonDominatedSorting().do(F, only_non_dominated_front=True)).tolist())
    return [p for i, p in enumerate(points) if i in keep]
