"""Smooth block latencies: the target's length's grid as straight lines over heads and units
(:func:`smooth_grid`), and the blocks at the table's other sequence lengths from the cross measured there
(:func:`blocks_at`).

At the target's own length the (heads x units) grid -- its cross measured, the other cells put together from it
(:func:`latency_models.assemble.fill_cross`), or all of it measured (``whole_grid``) -- is fitted additively (median
polish, :func:`latency_models.assemble.additive_fit`); :func:`smooth_grid` then makes its head effect a Theil-Sen
line over the head counts and its unit effect one over the unit counts. On the development machine (a shared 2-core
EPYC) one one-layer graph could read a third off its neighbours, and the polished grid still carried that from row to
row.

At each other length profiling measures the *cross* too (:func:`latency_models.assemble.cross_keys`): the base
graphs, every head count without FFN units, every unit count without heads and four diagonal cells. A layer's cost
is additive in its attention (heads) and its FFN (units): ``C(h, u) = C(h, 0) + C(0, u) - C0``. One measurement of a one-layer graph can be off by a third on a
shared machine (a neighbour's burst), so the cross is smoothed:

* ``C(h, 0)`` over the head counts and ``C(0, u)`` over the unit counts are straight lines (attention's work at a
  fixed length grows with the heads, the FFN's with the units), fitted with the Theil-Sen estimator
  (:func:`scipy.stats.theilslopes`, the median of pairwise slopes: a third of the points may be outliers);
* ``C0`` is the median, over the diagonal cells, of ``line_h(h) + line_u(u) - C(h, u)``.

Latency and working memory (memory beyond the weights) alike; weights do not change with the length. (An earlier
version added the change with the length to the own length's grid; that carried the own grid's cell-to-cell
noise, as large as a whole block at 16 or 32 tokens, into the short lengths.)
A device's table carries the cross as measured; nasprune fits it when it reads the table (:class:`LatencyTable`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import theilslopes

from latency_models.assemble import diagonal, grid_key

SMOOTH_METHOD = ("additive fit (median polish) of the measured grid, its head effect and its unit effect then each a "
                 "Theil-Sen line (scipy.stats.theilslopes) over the head / unit counts")
METHOD = ("Theil-Sen lines over the heads and over the units of the cross measured at that length, put together "
          "additively (offset: median over the diagonal cells)")


def _line(xs, ys):
    """The Theil-Sen line through ``(xs, ys)`` as a function (a constant with one point)."""
    if len(xs) < 2:
        c = float(ys[0]) if len(ys) else 0.0
        return lambda x: c
    slope, intercept, _, _ = theilslopes(ys, xs)
    return lambda x: float(intercept + slope * x)


def smooth_grid(grid, heads, units) -> list:
    """``grid`` (additive but for cell (0, 0), a dropped layer) with its row effect a line over the head counts and
    its column effect a line over the unit counts (the 0-head row and the 0-unit column keep theirs): with ``R[h]``
    the mean of row ``h`` over units > 0, ``C[u]`` the mean of column ``u`` over heads > 0 and ``M`` the mean over
    both, an additive grid is ``R[h] + C[u] - M``; ``R`` and ``C`` beyond 0 become Theil-Sen lines."""
    g = np.asarray(grid, float)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return g.tolist()
    rows, cols, mean = g[:, 1:].mean(axis=1), g[1:, :].mean(axis=0), g[1:, 1:].mean()
    line_h, line_u = _line(heads[1:], rows[1:]), _line(units[1:], cols[1:])
    rs = [rows[0]] + [line_h(h) for h in heads[1:]]
    cs = [cols[0]] + [line_u(u) for u in units[1:]]
    return [[0.0 if i == 0 and j == 0 else float(rs[i] + cs[j] - mean) for j in range(len(units))]
            for i in range(len(heads))]


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
            def cost(h, u):  # a block's cost at n: one-layer graph minus zero-layer graph (memory: beyond weights)
                weights = data["blocks"]["weights_mb"][heads.index(h)][units.index(u)] if field == "memory_mb" else 0.0
                return at(grid_key(h, u))[field] - ref[field] - weights

            line_h = _line(heads[1:], [cost(h, units[0]) for h in heads[1:]])
            line_u = _line(units[1:], [cost(heads[0], u) for u in units[1:]])
            c0 = float(np.median([line_h(h) + line_u(u) - cost(h, u) for h, u in diagonal(heads, units)] or [0.0]))
            part["blocks"][grid] = [[0.0 if h == heads[0] and u == units[0] else (
                line_h(h) if u == units[0] else line_u(u) if h == heads[0] else line_h(h) + line_u(u) - c0)
                for u in units] for h in heads]
        out[str(n)] = part
    return out
