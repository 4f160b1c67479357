"""How many end-to-end calibration samples does a latency table need? (issue: latency you can count on)

A table's calibration (:meth:`latency_models.lookup_table.LatencyTable.calibrate_from`) fits measured against
summed-block latency on ``calibration_samples`` random sub-networks plus the unpruned network (the anchor, weighted as
many samples as there are). Each sample costs an export and three rounds beside the unpruned network. This benchmark
refits the calibrations stored in existing tables, at their own length, on the first ``k`` of their samples (they are
stored in random order of size, :func:`latency_models.calibration.samples`), with the anchor weighted ``k``, for each
``k`` of ``--sizes``, and scores each fit on the table's held-out validation samples, drift-corrected as the compile
compares. Nothing is measured: it reads the tables.

    python benchmarks/bench_calibration_size.py --table T.json [--table T2.json ...] [--sizes 4,6,8,10,12]
        [--section NAME] [--no-docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (held_out_errors, machine, markdown_table, publish, refit_latency, section_name,  # noqa: E402
                    stored_calibration, table_arguments)


def errors(table, sizes: list[int]) -> dict:
    """``{k: relative errors on the held-out samples}`` of ``table`` at its own length (empty when it lacks what the
    refit needs)."""
    stored = stored_calibration(table)
    if stored is None or len(stored[0]) < 2:
        return {}
    samples, held, speed = stored
    drawn, anchor = samples[:-1], samples[-1]
    out = {}
    for k in sizes:
        if k > len(drawn):
            continue
        trial = refit_latency(table, drawn[:k] + [anchor], [1.0] * k + [float(max(1, k))])
        out[k] = held_out_errors(trial, held, speed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    table_arguments(ap, "bench_calibration_size")
    ap.add_argument("--sizes", default="4,6,8,10,12", help="calibration sample counts to compare")
    args = ap.parse_args()

    from latency_models.lookup_table import LatencyTable

    sizes = [int(k) for k in args.sizes.split(",")]
    held = {k: [] for k in sizes}
    tables = {k: 0 for k in sizes}
    for path in dict.fromkeys(args.table):
        for k, e in errors(LatencyTable.load(path), sizes).items():
            held[k] += e
            tables[k] += 1
    rows = []
    for k in sizes:
        h = np.abs(held[k])
        if len(h):
            rows.append([k, tables[k], len(h), f"{100 * h.mean():.2f}", f"{100 * np.median(h):.2f}",
                         f"{100 * h.max():.2f}", f"{100 * np.mean(h <= 0.05):.1f}", f"{100 * np.mean(h <= 0.10):.1f}"])
    lines = [f"Command: `python benchmarks/bench_calibration_size.py` with {len(dict.fromkeys(args.table))} tables "
             f"(`--table`), `--sizes {args.sizes}`. Machine: {machine()}.", "",
             "Each table's stored calibration at its own length refitted on its first k samples (the unpruned anchor "
             "weighted k); held-out: the table's validation sub-networks, drift-corrected.", "",
             *markdown_table(["calibration samples", "tables", "held-out n", "MAPE %", "median %", "max %",
                              "within 5 %", "within 10 %"], rows, right=set(range(1, 8)))]
    publish(section_name("bench_calibration_size", args.section), lines, write=not args.no_docs)


if __name__ == "__main__":
    main()
