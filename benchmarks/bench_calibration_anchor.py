"""How much should the unpruned network weigh in a latency table's calibration? (issue: latency you can count on)

A table's end-to-end calibration (:meth:`latency_models.lookup_table.LatencyTable.calibrate_from`) fits measured
against summed-block latency on its calibration sub-networks plus one anchor, the unpruned network, whose latency is
the quiet reading of the reference measured beside every sample. This benchmark refits the calibrations stored in
existing tables (every length that has calibration and validation samples) with the anchor counted as ``w`` samples,
for each ``w`` of ``--weights`` (``n``: as many as the calibration has samples, the default of ``calibrate_from``),
and scores each fit on the table's own held-out validation samples (drift-corrected, as the compile compares) and on
the unpruned network (its drift-corrected latency is the anchor itself, so the error there is the fit's miss, and
every export's prediction of the unpruned reference carries it). Nothing is measured: it reads the tables.

    python benchmarks/bench_calibration_anchor.py --table T.json [--table T2.json ...] [--weights 1,5,n,100]
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


def fits(table, weights: list[str]):
    """``{weight: (validation residuals, unpruned residuals)}`` over every length of ``table`` that has both."""
    from toolchain.core.subnetwork import SubNetwork

    out = {w: ([], []) for w in weights}
    for length in table.lengths():
        view = table.at_length(length)
        stored = stored_calibration(view)
        if stored is None:
            continue
        samples, held, speed = stored
        for w in weights:
            anchor = float(len(samples) - 1) if w == "n" else float(w)
            trial = refit_latency(view, samples, [1.0] * (len(samples) - 1) + [anchor])
            out[w][0].extend(held_out_errors(trial, held, speed))
            out[w][1].append(speed / trial.predict_latency(SubNetwork.from_dict(samples[-1]["subnet"])) - 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    table_arguments(ap, "bench_calibration_anchor")
    ap.add_argument("--weights", default="1,5,n,100", help="the anchor's weights to compare (n: the samples' count)")
    args = ap.parse_args()

    from latency_models.lookup_table import LatencyTable

    weights = args.weights.split(",")
    held = {w: [] for w in weights}
    unpruned = {w: [] for w in weights}
    for path in dict.fromkeys(args.table):
        for w, (h, u) in fits(LatencyTable.load(path), weights).items():
            held[w] += h
            unpruned[w] += u
    rows = []
    for w in weights:
        h, u = np.abs(held[w]), np.abs(unpruned[w])
        rows.append([w + (" (default)" if w == "n" else ""), len(h), f"{100 * h.mean():.2f}",
                     f"{100 * np.mean(h <= 0.05):.1f}", f"{100 * np.mean(h <= 0.10):.1f}", len(u),
                     f"{100 * u.mean():.2f}", f"{100 * u.max():.2f}", f"{100 * np.mean(u <= 0.05):.0f}"])
    lines = [f"Command: `python benchmarks/bench_calibration_anchor.py` with {len(dict.fromkeys(args.table))} "
             f"tables (`--table`, every length with calibration and validation samples), `--weights {args.weights}`. "
             f"Machine: {machine()}.", "",
             "Each stored calibration refitted with the unpruned network counted as `w` samples; held-out: the "
             "table's validation sub-networks, drift-corrected; unpruned: the fit's miss at the unpruned network "
             "(what every export's prediction of the reference carries).", "",
             *markdown_table(["anchor weight", "held-out n", "MAPE %", "within 5 %", "within 10 %", "unpruned n",
                              "mean error %", "max error %", "within 5 %"], rows, right=set(range(1, 9)))]
    publish(section_name("bench_calibration_anchor", args.section), lines, write=not args.no_docs)


if __name__ == "__main__":
    main()
