"""A latency table's blocks at its other sequence lengths, from the cross of the grid measured there.

Profiling measures the whole (heads x units) grid at the target's own length, and at each other length only the
*cross* (:func:`latency_models.assemble.cross_keys`): the base graphs, every head count without FFN units, every
unit count without heads and four diagonal cells. A layer's cost is additive in its attention (heads) and its FFN
(units), so the change of every cell with the length, ``D(h, u)`` (block cost at that length minus at the target's),
is ``D(h, 0) + D(0, u) - D0``. One measurement of a one-layer graph can be off by a third on a shared machine (a
neighbour's burst; the own-length grid absorbs that in its median polish), so the cross is smoothed first:

* ``D(h, 0)`` over the head counts and ``D(0, u)`` over the unit counts are straight lines (attention's work at a
  fixed length grows with the heads, the FFN's with the units), fitted with the Theil-Sen estimator
  (:func:`scipy.stats.theilslopes`, the median of pairwise slopes: a third of the points may be outliers);
* ``D0`` is the median, over the diagonal cells, of ``line_h(h) + line_u(u) - D(h, u)``.

Block latency at the length = the table's own (fitted) grid + ``D``; working memory alike; weights do not change.
A device's table carries the cross as measured; nasprune fits it when it reads the table (:class:`LatencyTable`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import theilslopes

from latency_models.assemble import diagonal, grid_key

METHOD = ("block cost at the target's length + the change with the length: Theil-Sen lines over the heads and over "
          "the units of the cross measured at that length, put together additively (offset: median over the "
          "diagonal cells)")


def _line(xs, ys):
    """The Theil-Sen line through ``(xs, ys)`` as a function (a constant with one point)."""
    if len(xs) < 2:
        c = float(ys[0]) if len(ys) else 0.0
        return lambda x: c
    slope, intercept, _, _ = theilslopes(ys, xs)
    return lambda x: float(intercept + slope * x)


def blocks_at(data: dict) -> dict:
    """``{"<length>": {"base", "blocks", "method"}}`` for every other length of a table's JSON ``data`` whose cross
    was measured (``data["lengths"]["cross"]``: ``"<graph key>@<length>"`` -> latency, memory)."""
    lengths = data["lengths"]
    cross, own = lengths["cross"], int(data["fingerprint"].get("sequence_length") or 128)
    heads, units = data["grid"]["heads"], data["grid"]["units"]
    out = {}
    for n in (int(x) for x in lengths["grid"] if int(x) != own):
        def at(key):
            return cross[f"{key}@{n}"]

        ref = at("base_micro") if f"base_micro@{n}" in cross else at("base")
        part = {"base": {"latency_ms": at("base")["latency_ms"], "memory_mb": at("base")["memory_mb"],
                         "weights_mb": data["base"].get("weights_mb", 0.0)},
                "blocks": {"weights_mb": data["blocks"]["weights_mb"]}, "method": METHOD}
        for field, grid in (("latency_ms", "latency_ms"), ("memory_mb", "working_mb")):
            own_grid = data["blocks"][grid]  # latency: the additive fit of the own length's grid

            def delta(h, u):  # the change of a cell's cost from the own length to n
                i, j = heads.index(h), units.index(u)
                weights = data["blocks"]["weights_mb"][i][j] if field == "memory_mb" else 0.0  # memory: beyond them
                return (at(grid_key(h, u))[field] - ref[field] - weights) - own_grid[i][j]

            line_h = _line(heads[1:], [delta(h, units[0]) for h in heads[1:]])
            line_u = _line(units[1:], [delta(heads[0], u) for u in units[1:]])
            d0 = float(np.median([line_h(h) + line_u(u) - delta(h, u) for h, u in diagonal(heads, units)] or [0.0]))
            part["blocks"][grid] = [[0.0 if h == heads[0] and u == units[0] else own_grid[i][j] + (
                line_h(h) if u == units[0] else line_u(u) if h == heads[0] else line_h(h) + line_u(u) - d0)
                for j, u in enumerate(units)] for i, h in enumerate(heads)]
        out[str(n)] = part
    return out
