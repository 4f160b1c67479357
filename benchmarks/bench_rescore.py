"""Which of several latency tables predicts better, measured on the same sub-networks? (issue: latency you can count on)

Two tables of one model, target and precision -- profiled by two versions of nasprune, or with two settings, one
after the other -- each carry the end-to-end samples they were calibrated and validated on (``bench_latency.py``
writes them to ``benchmarks/results/``). Their figures differ by their grids *and* by the noise of those samples'
measurements, which on a shared machine is the larger part. Here every table's grid is calibrated and scored on every
table's samples in turn: the calibration refitted on those calibration samples (the unpruned anchor weighed as
:meth:`~latency_models.lookup_table.LatencyTable.calibrate_from` weighs it), the error taken on those held-out
validation samples, drift-corrected as a compile compares. Along a row (one set of samples) only the grid differs.
Nothing is measured: it reads the tables.

    python benchmarks/bench_rescore.py --table A.json --table B.json [--length 32 --length 128] [--no-docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (held_out_errors, machine, markdown_table, publish, recalibrated, section_name,  # noqa: E402
                    stored_calibration)


def rescored(grid, samples_table) -> list[float] | None:
    """``grid``'s relative errors on ``samples_table``'s held-out samples, after calibrating ``grid`` (a copy) on
    ``samples_table``'s calibration samples; both views at one length. ``None`` where the samples are missing."""
    stored = stored_calibration(samples_table)
    if stored is None:
        return None
    samples, held, speed = stored
    return held_out_errors(recalibrated(grid, samples), held, speed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="append", required=True,
                    help="a latency table with its calibration and validation samples (JSON; two or more)")
    ap.add_argument("--length", type=int, action="append", default=None,
                    help="a sequence length to score at (repeatable; default: every length the tables share)")
    ap.add_argument("--section", default="", help="write the docs section bench_rescore-SECTION instead")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    if len(args.table) < 2:
        ap.error("give two tables or more (--table A.json --table B.json)")
    from latency_models.lookup_table import LatencyTable, TableError

    tables = []
    for path in args.table:
        try:
            tables.append(LatencyTable.load(path))
        except (OSError, TableError) as e:
            ap.error(f"{path}: {e}")
    kinds = {(t.precision, t.fingerprint.get("target"), tuple(sorted(t.model.items()))) for t in tables}
    if len(kinds) > 1:
        ap.error("the tables must be of one model, target and precision")
    shared = sorted(set.intersection(*(set(t.lengths()) for t in tables)))
    lengths = args.length or shared
    missing = [n for n in lengths if n not in shared]
    if missing:
        ap.error(f"length(s) {missing} not measured in every table (shared: {shared})")

    names = [f"T{i + 1}" for i in range(len(tables))]
    rows = []
    for n in lengths:
        views = [t.at_length(n) for t in tables]
        for s_name, samples in zip(names, views):
            cells = [n, s_name]
            for grid in views:
                e = rescored(grid, samples)
                if e is None:
                    cells.append("-")
                    continue
                e = np.abs(e)
                cells.append(f"{100 * np.mean(e <= 0.05):.0f} / {100 * np.mean(e <= 0.10):.0f} / {100 * e.mean():.1f}"
                             f" (n={len(e)})")
            rows.append(cells)
    legend = [f"- {name}: `{path}` ({t.precision}, target {t.fingerprint.get('target')}, "
              f"{t.fingerprint.get('threads')} threads, table version {t.data.get('version')}, created "
              f"{t.data.get('created', '?')})" for name, path, t in zip(names, args.table, tables)]
    lines = [f"Command: `python benchmarks/bench_rescore.py` with {len(tables)} tables (`--table`). "
             f"Machine: {machine()}.", "", *legend, "",
             "Each cell: the grid of the column's table, calibrated on the row's table's calibration samples and "
             "scored on its held-out validation samples, drift-corrected: within ±5 % / within ±10 % / MAPE %.", "",
             *markdown_table(["length", "samples of"] + [f"grid of {x}" for x in names], rows,
                             right=set(range(0, len(names) + 2)))]
    publish(section_name("bench_rescore", args.section), lines, write=not args.no_docs)


if __name__ == "__main__":
    main()
