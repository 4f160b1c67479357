"""Hypervolume with a fixed normalisation, and the knee point of a front.

Hypervolume values are only comparable when the normalisation and the reference point are the same. Here both
depend on the *problem* only, never on the pool of results:

* ``error`` (validation error in [0, 1]) is used as is (normaliser 1.0);
* ``latency`` (ms), ``memory`` (MB) and ``params`` are divided by the value of the unpruned (largest) network;
* the reference point is :data:`REFERENCE_POINT` (1.1) in every normalised objective.

So the unpruned network itself sits at (error, 1.0, ...) and a sub-network that is larger or slower than 1.1x the
unpruned one adds nothing. The indicator itself is :class:`pymoo.indicators.hv.HV`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

OBJECTIVES = ("error", "latency", "memory", "params")
REFERENCE_POINT = 1.1
#: objectives whose natural scale is already [0, 1]; their normaliser defaults to 1.0
UNIT_SCALE = {"error": 1.0}


def normalise(points, objectives: Sequence[str], reference: Mapping[str, float]) -> np.ndarray:
    """Divide each objective column by its fixed normaliser (``error`` defaults to 1.0)."""
    F = np.asarray(points, dtype=float).reshape(-1, len(objectives))
    scale = np.empty(len(objectives))
    for j, name in enumerate(objectives):
        if name in reference:
            value = float(reference[name])
        elif name in UNIT_SCALE:
            value = UNIT_SCALE[name]
        else:
            raise ValueError(
                f"no normaliser for objective '{name}': pass the unpruned network's {name} "
                f"(normalizers={{'{name}': ...}})"
            )
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"normaliser for '{name}' must be a positive number, got {value}")
        scale[j] = value
    return F / scale


def hypervolume(points, objectives: Sequence[str], reference: Mapping[str, float]) -> float:
    """Hypervolume of ``points`` (rows of objective values, all minimised) after the fixed normalisation.

    ``reference`` maps objective name -> normaliser (the unpruned network's latency / memory / params; ``error``
    defaults to 1.0). The reference point is :data:`REFERENCE_POINT` in each normalised objective; points beyond it
    contribute nothing. Dominated points may be included (they add nothing). No points -> 0.0.
    """
    from pymoo.indicators.hv import HV

    F = normalise(points, objectives, reference)
    if len(F) == 0:
        return 0.0
    F = F[np.all(np.isfinite(F), axis=1) & np.all(F < REFERENCE_POINT, axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=np.full(F.shape[1], REFERENCE_POINT))(F))


def knee_index(front) -> int | None:
    """Index of the knee of a non-dominated set ``front`` (rows, minimised; ideally already normalised).

    Definition: scale each objective to [0, 1] by the front's own minimum and maximum, and take the point with the
    smallest sum of scaled objectives. For two objectives this is exactly the point farthest from (below) the line
    through the two extreme points of the front; for more objectives, the farthest from the hyperplane through the
    unit points. Objectives that do not vary on the front are ignored. Ties -> the first such row.
    """
    F = np.asarray(front, dtype=float)
    if F.ndim != 2 or len(F) == 0:
        return None
    lo, hi = F.min(axis=0), F.max(axis=0)
    span = hi - lo
    varying = span > 0
    if not varying.any():
        return 0
    scaled = (F[:, varying] - lo[varying]) / span[varying]
    return int(np.argmin(scaled.sum(axis=1)))
