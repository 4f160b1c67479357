"""How much of the profiling grid does a latency table need at its own sequence length? (issue: latency you can count on)

A table measured the whole (heads x units) grid of one-layer graphs at the target's length (13 x 13 for
all-MiniLM-L6-v2 at the default unit step of 128) and only the *cross* (every head count without units, every unit
count without heads, four diagonal cells) at its other lengths, put together additively
(:func:`latency_models.lengths.blocks_at`); since this benchmark, the own length too
(:func:`latency_models.assemble.fill_cross`). This benchmark rebuilds the own length's blocks of existing tables from
a part of their measured grid -- every other unit count, every other head and unit count, the cross alone -- refits
each table's end-to-end calibration on its stored calibration samples (the anchor as :meth:`calibrate_from` weighs
it) and scores each variant on the table's own held-out validation samples, drift-corrected as the compile compares.
Nothing is measured: it reads the tables. ``graphs``: one-layer graphs measured at the own length.

    python benchmarks/bench_grid_density.py --table T.json [--table T2.json ...] [--section NAME] [--no-docs]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (held_out_errors, machine, markdown_table, publish, recalibrated, section_name,  # noqa: E402
                    stored_calibration, table_arguments)

VARIANTS = ("whole grid (the default before)", "every other unit count", "every other head and unit count",
            "cross only (default)")


def _subgrid(data: dict, hi: list[int], ui: list[int]) -> dict:
    """``data`` with its own length's grid cut to the head indices ``hi`` and unit indices ``ui``."""
    d = copy.deepcopy(data)
    d["grid"] = {"heads": [data["grid"]["heads"][i] for i in hi], "units": [data["grid"]["units"][j] for j in ui]}
    for k in ("measured_latency_ms", "weights_mb", "working_mb"):
        d["blocks"][k] = [[data["blocks"][k][i][j] for j in ui] for i in hi]
    return d


def variant(data: dict, name: str) -> tuple[dict, int]:
    """The table JSON ``data`` with its own length's blocks rebuilt as ``name`` says (uncalibrated), and how many
    one-layer graphs that variant measures."""
    from latency_models.assemble import additive_fit, cross_keys, fill_cross, grid_key

    heads, units = data["grid"]["heads"], data["grid"]["units"]
    every = list(range(len(heads))), list(range(len(units)))
    half_u = [j for j in every[1] if j % 2 == 0 or j == len(units) - 1]
    half_h = [i for i in every[0] if i % 2 == 0 or i == len(heads) - 1]
    d = {VARIANTS[0]: lambda: _subgrid(data, *every), VARIANTS[1]: lambda: _subgrid(data, every[0], half_u),
         VARIANTS[2]: lambda: _subgrid(data, half_h, half_u), VARIANTS[3]: lambda: copy.deepcopy(data)}[name]()
    blocks = d["blocks"]
    if name == VARIANTS[3]:  # what a profile measures by default, put together as it does (fill_cross): latency,
        cross = cross_keys(heads, units)  # weights and working memory alike
        for k in ("measured_latency_ms", "weights_mb", "working_mb"):
            blocks[k] = fill_cross([[v if grid_key(h, u) in cross or not (h or u) else float("nan")
                                     for u, v in zip(units, row)] for h, row in zip(heads, blocks[k])], heads, units)
        n = len(cross & {grid_key(h, u) for h in heads for u in units if h or u})
    else:
        n = len(d["grid"]["heads"]) * len(d["grid"]["units"]) - 1  # not (0, 0): a dropped layer
    blocks["latency_ms"] = additive_fit(blocks["measured_latency_ms"])  # as a profile assembles it; the table
    blocks.pop("fit", None)  # smooths it when read
    d["calibration"] = {"latency": {"a": 1.0, "b": 0.0, "n": 0}, "memory": {"a": 1.0, "b": 0.0, "n": 0}}
    d.pop("lengths", None)
    return d, n


def table_errors(path) -> dict:
    """``{variant: (relative latency errors on the held-out samples, memory errors, graphs)}`` for one table (its
    own length)."""
    import json

    from latency_models.lookup_table import LatencyTable
    from toolchain.core.subnetwork import SubNetwork

    data = json.loads(Path(path).read_text())
    if any(v is None for row in data["blocks"]["measured_latency_ms"] for v in row):
        return {}  # profiled on the cross only: no whole grid to compare with
    stored = stored_calibration(LatencyTable(copy.deepcopy(data)))
    if stored is None:
        return {}
    samples, held, speed = stored
    out = {}
    for name in VARIANTS:
        built, n = variant(data, name)
        t = recalibrated(LatencyTable(built), samples)
        mem = data["calibration"].get("memory") or {}
        t.set_calibration("memory", [t.raw_memory(SubNetwork.from_dict(s["subnet"])) for s in mem.get("samples", [])],
                          [s["measured"] for s in mem.get("samples", [])])
        mem_errs = [s["measured"] / t.predict_memory(SubNetwork.from_dict(s["subnet"])) - 1
                    for s in (data["validation"].get("memory") or {}).get("samples") or []]
        out[name] = (held_out_errors(t, held, speed), mem_errs, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    table_arguments(ap, "bench_grid_density")
    args = ap.parse_args()

    errors = {name: ([], []) for name in VARIANTS}
    counts, tables = {}, 0
    for path in dict.fromkeys(args.table):
        got = table_errors(path)
        tables += bool(got)
        for name, (e, m, n) in got.items():
            errors[name][0].extend(e)
            errors[name][1].extend(m)
            counts[name] = n
    rows = []
    for name in VARIANTS:
        e, m = (np.abs(x) for x in errors[name])
        if len(e):
            rows.append([name, counts[name], len(e), f"{100 * e.mean():.2f}", f"{100 * e.max():.2f}",
                         f"{100 * np.mean(e <= 0.05):.1f}", f"{100 * np.mean(e <= 0.10):.1f}", len(m),
                         f"{100 * m.mean():.2f}" if len(m) else "-", f"{100 * np.mean(m <= 0.05):.1f}" if len(m) else "-"])
    lines = [f"Command: `python benchmarks/bench_grid_density.py` with {tables} tables (`--table`). "
             f"Machine: {machine()}.", "",
             "Each table's own-length blocks rebuilt from part of its measured grid, its calibration refitted on its "
             "stored samples; held-out: the table's validation sub-networks at its own length, drift-corrected. "
             "graphs: one-layer graphs measured at the own length.", "",
             *markdown_table(["own-length grid", "graphs", "held-out n", "latency MAPE %", "max %", "within 5 %",
                              "within 10 %", "memory n", "memory MAPE %", "within 5 %"], rows,
                             right=set(range(1, 10)))]
    publish(section_name("bench_grid_density", args.section), lines, write=not args.no_docs)

if __name__ == "__main__":
    main()
