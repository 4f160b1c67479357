#!/usr/bin/env python3
"""The latency table from the measured grid: block costs, their additive fit, and the blocks at other lengths.

Standalone (standard library and ``numpy``): it runs inside nasprune (:func:`latency_models.profile.profile`) and
on a device, copied into a profiling bundle as ``nasprune_assemble.py`` next to ``run_profile.py``.
"""

from __future__ import annotations

import time
from math import nan

try:  # inside nasprune
    from targets.meter import DEFAULT_MEASUREMENT, MB, MEMORY_METHOD
    from targets.session import fingerprint_key
except ImportError:  # inside a bundle
    from nasprune_meter import DEFAULT_MEASUREMENT, MB, MEMORY_METHOD  # type: ignore
    from nasprune_session import fingerprint_key  # type: ignore

TABLE_FORMAT = "nasprune.latency_table"
TABLE_VERSION = 1


def grid_key(h: int, u: int) -> str:
    return f"h{h}_u{u}"


def diagonal(heads, units) -> list[tuple[int, int]]:
    """Four cells across the grid, from a quarter of the heads and units to all of them: where the cross's
    attention and FFN parts are put together and checked (:func:`latency_models.lengths.blocks_at`)."""
    cells = []
    for k in (1, 2, 3, 4):
        h, u = heads[round(k * (len(heads) - 1) / 4)], units[round(k * (len(units) - 1) / 4)]
        if h and u and (h, u) not in cells:
            cells.append((h, u))
    return cells


def cross_keys(heads, units) -> set:
    """The graphs measured at every length of a table: the base graphs, every head count without units, every unit
    count without heads, and the :func:`diagonal` cells."""
    return ({"base", "base_micro"} | {grid_key(h, units[0]) for h in heads[1:]} |
            {grid_key(heads[0], u) for u in units[1:]} | {grid_key(h, u) for h, u in diagonal(heads, units)})


def additive_fit(grid, skip=((0, 0),), iters: int = 20):
    """Robust additive fit ``grid[h][u] ~ row[h] + col[u]`` (Tukey's median polish), ignoring the ``skip`` cells.

    A layer runs its attention block (cost depends on heads only) and then its FFN block (units only), so its
    latency is additive in the two; the median polish estimates both from the whole grid, so a point disturbed by
    another process (a preempted thread can double a run) does not become a wrong table entry.
    """
    import numpy as np

    m = np.array(grid, dtype=float)
    for h, u in skip:
        m[h, u] = np.nan
    row, col = np.zeros(m.shape[0]), np.zeros(m.shape[1])
    for _ in range(iters):
        r = np.nanmedian(m, axis=1)
        row += r
        m -= r[:, None]
        c = np.nanmedian(m, axis=0)
        col += c
        m -= c[None, :]
    fit = row[:, None] + col[None, :]
    for h, u in skip:
        fit[h, u] = 0.0
    return fit.tolist()


def fill_cross(grid, heads, units) -> list:
    """``grid`` (heads x units, ``nan`` where a cell was not measured) with every missing cell put together from the
    cross: ``C(h, u) = C(h, 0) + C(0, u) - C0``, a layer's cost being additive in its attention and its FFN, with
    ``C0`` (what a one-layer graph costs whatever it keeps) the median over the measured :func:`diagonal` cells of
    ``C(h, 0) + C(0, u) - C(h, u)``. Measured cells stay as measured (the additive fit and the smoothing of the
    table come after). numpy only: a device assembles its table too."""
    import numpy as np

    g = np.array(grid, dtype=float)
    cells = [(heads.index(h), units.index(u)) for h, u in diagonal(heads, units)]
    c0 = [g[i, 0] + g[0, j] - g[i, j] for i, j in cells if np.isfinite(g[i, j])]
    filled = np.where(np.isnan(g), g[:, :1] + g[:1, :] - (float(np.median(c0)) if c0 else 0.0), g)
    filled[0, 0] = g[0, 0] if np.isfinite(g[0, 0]) else 0.0
    return filled.tolist()


def assemble_table(manifest: dict, results: dict, fingerprint: dict, wall_s: float | None = None) -> dict:
    """The latency table (see docs/profiling.md) from the per-graph measurements.

    Block cost of a layer with ``h`` heads and ``u`` units = T(one-layer model h,u) - T(zero-layer model of the same
    vocabulary, ``base_micro`` when present); the zero-layer model with the real vocabulary (embeddings, pooler,
    classifier, session overhead) is the base. A layer keeping nothing is dropped: its cost is 0. The block
    latencies the predictor uses are the additive fit of the measured ones (:func:`additive_fit`); the raw
    measurements are kept as ``blocks.measured_latency_ms``.
    """
    heads, units = manifest["grid"]["heads"], manifest["grid"]["units"]
    base = results["base"]
    base_w = base.get("weight_bytes", 0) / MB
    ref = results.get("base_micro", base)  # the zero-layer graph with the one-layer graphs' vocabulary
    ref_w = ref.get("weight_bytes", 0) / MB
    lat, wts, work, reps = [], [], [], []
    for h in heads:
        rl, rw, rk, rr = [], [], [], []
        for u in units:
            if h == 0 and u == 0:
                rl.append(0.0), rw.append(0.0), rk.append(0.0), rr.append(0)
                continue
            r = results.get(grid_key(h, u))
            if r is None:  # not measured (only the cross is, by default): put together from it below
                rl.append(nan), rw.append(nan), rk.append(nan), rr.append(0)
                continue
            w = r.get("weight_bytes", 0) / MB - ref_w
            rl.append(r["latency_ms"] - ref["latency_ms"])
            rw.append(w)
            rk.append(r["memory_mb"] - ref["memory_mb"] - w)
            rr.append(r["reps"])
        lat.append(rl), wts.append(rw), work.append(rk), reps.append(rr)
    measured = [[None if v != v else v for v in row] for row in lat]  # JSON: null where not measured
    cross = any(v != v for row in lat for v in row)
    if cross:
        lat, wts, work = (fill_cross(g, heads, units) for g in (lat, wts, work))
    table = {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_key": fingerprint_key(fingerprint),
        "target": manifest["target"],
        "model": manifest["model"],
        "graph_form": manifest.get("graph_form"),  # toolchain.onnx.build.graph_form: the graphs measured
        "grid": {"heads": list(heads), "units": list(units)},
        "base": {"latency_ms": base["latency_ms"], "memory_mb": base["memory_mb"], "weights_mb": base_w},
        "blocks": {"latency_ms": additive_fit(lat) if len(heads) > 1 and len(units) > 1 else lat,
                   "measured_latency_ms": measured, "weights_mb": wts, "working_mb": work},
        "measurement": {
            **{k: manifest["measurement"].get(k, v) for k, v in DEFAULT_MEASUREMENT.items()},
            "reps": reps,
            "base_reps": base["reps"],
            "method": "one-layer sliced model minus zero-layer model, exported and fused like the compiled models; "
                      "block latency = additive fit attention(h) + ffn(u) of the measured grid (median polish)"
                      + ("; the grid's cells off its cross put together from it (fill_cross)" if cross else ""),
            "memory_method": MEMORY_METHOD,
            "wall_s": wall_s,
        },
        "calibration": {"latency": {"a": 1.0, "b": 0.0, "n": 0}, "memory": {"a": 1.0, "b": 0.0, "n": 0}},
        "validation": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if len(manifest.get("lengths") or ()) > 1 and len(heads) > 1 and len(units) > 1:
        # the cross measured at the other lengths, as measured: nasprune fits the blocks there when it reads the
        # table (latency_models.lengths; scipy, which a device need not have)
        table["lengths"] = {"grid": list(manifest["lengths"]), "cross": {
            k: {f: r[f] for f in ("latency_ms", "memory_mb", "reps") if f in r} for k, r in results.items() if "@" in k}}
    return table


# ----------------------------------------------------------------------------------------- the file format
_REQUIRED = {
    "format": str, "version": int, "fingerprint": dict, "model": dict, "grid": dict, "base": dict, "blocks": dict,
    "measurement": dict,
}


def table_problem(data) -> str | None:
    """What is wrong with a latency table's JSON ``data`` (the first thing found), or ``None``."""
    import numpy as np

    class Problem(Exception):
        pass

    def fail(msg):
        raise Problem(msg)

    try:
        _check(data, fail, np)
    except Problem as e:
        return str(e)
    return None


def _check(data, fail, np) -> None:
    if not isinstance(data, dict):
        fail("not a latency table (expected a JSON object)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    for k, t in _REQUIRED.items():
        if not isinstance(data[k], t):
            fail(f"key '{k}' should be a {t.__name__}, got {type(data[k]).__name__}")
    if data["format"] != TABLE_FORMAT:
        fail(f"format is {data['format']!r}, expected {TABLE_FORMAT!r}")
    if data["version"] > TABLE_VERSION:
        fail(f"table version {data['version']} is newer than this nasprune understands ({TABLE_VERSION})")
    for k in ("precision", "provider", "onnxruntime", "threads"):
        if k not in data["fingerprint"]:
            fail(f"fingerprint has no '{k}'")
    grid = data["grid"]
    for axis in ("heads", "units"):
        vals = grid.get(axis)
        if not isinstance(vals, list) or not vals or not all(isinstance(v, int) and v >= 0 for v in vals):
            fail(f"grid.{axis} must be a non-empty list of integers >= 0")
        if sorted(set(vals)) != vals:
            fail(f"grid.{axis} must be strictly increasing")
    for k in ("latency_ms", "memory_mb"):
        if not isinstance(data["base"].get(k), (int, float)):
            fail(f"base.{k} missing or not a number")
    shape = (len(grid["heads"]), len(grid["units"]))
    for k in ("latency_ms", "weights_mb", "working_mb"):
        block = data["blocks"].get(k)
        if block is None:
            fail(f"blocks.{k} missing")
        try:
            arr = np.asarray(block, dtype=float)
        except (TypeError, ValueError):
            fail(f"blocks.{k} is not a numeric grid")
        if arr.shape != shape:
            fail(f"blocks.{k} has shape {arr.shape}, the grid needs {shape} (heads x units)")
        if not np.all(np.isfinite(arr)):
            fail(f"blocks.{k} contains non-finite values")
