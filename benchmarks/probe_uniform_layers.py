#!/usr/bin/env python3
"""Where does a latency table miss? Networks whose every layer keeps the same heads and FFN units, measured end to end.

A table predicts a sub-network as its base plus one block per layer (:class:`latency_models.lookup_table.LatencyTable`),
the blocks of most (heads, units) cells put together from the measured cross of the grid
(:func:`latency_models.assemble.fill_cross`). Random validation sub-networks mix layer sizes, so their errors do not
say which cells are off. Here each network repeats one cell in every layer: its error, spread over its layers, is the
error of that cell's block (after the calibration). Each network is measured right after the unpruned network, and
its reading is drift-corrected to the table's calibration speed, as a compile's exports are
(:func:`targets.meter.measure_beside`, :func:`targets.meter.paired_drift_corrected`).

    python benchmarks/probe_uniform_layers.py --table T.json [--precision int8] [--length 128]
        [--cells 1x128,2x256,...] [--rounds 3]

``--table``: a latency table of the default model (e.g. ``<cache>/tables/*.json`` after a compile, or
``benchmarks/results/*.json`` after bench_latency), of the precision given. Prints one line per network (the median
of its rounds, each round too); nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_CELLS = ("1x64,1x128,2x128,2x256,3x384,4x512,6x768,8x1024,10x1280,12x1536,0x256,2x0,1x1536,12x128")


def cell(text: str) -> tuple[int, int]:
    try:
        heads, units = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not HEADSxUNITS (e.g. 2x256)") from None
    if heads < 0 or units < 0 or heads + units == 0:
        raise argparse.ArgumentTypeError(f"'{text}': a layer keeps some heads or units, none negative")
    return heads, units


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", required=True, help="a latency table (JSON) of the default model")
    ap.add_argument("--precision", default="int8", choices=("fp32", "int8"))
    ap.add_argument("--target", default="cpu", help="target name or TOML path (as the table was profiled on)")
    ap.add_argument("--length", type=int, default=None, help="sequence length (default: the table's own)")
    ap.add_argument("--cells", default=DEFAULT_CELLS,
                    help="comma-separated HEADSxUNITS cells, each repeated in every layer")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per network, each right after one of the unpruned network (the median is reported)")
    args = ap.parse_args(argv)
    try:
        cells = [cell(c) for c in args.cells.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not Path(args.table).is_file():
        ap.error(f"no latency table at {args.table}")

    import tempfile

    import torch

    from latency_models.grid import Worker, config_for, export_graph
    from latency_models.lookup_table import LatencyTable
    from targets import load_target
    from targets.meter import drift_corrected, measure_beside, paired_drift_corrected
    from toolchain.core.modeling import ModelDims, load_config, model_from_config
    from toolchain.core.slicing import slice_model
    from toolchain.core.subnetwork import SubNetwork

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    table = LatencyTable.load(args.table)
    if table.precision != args.precision:
        ap.error(f"{args.table} is a table of {table.precision}, not {args.precision}")
    length = args.length or table.sequence_length
    table = table.at_length(length)
    target = replace(load_target(args.target), sequence_length=length)
    _, config = load_config(None)
    dims = ModelDims.from_config(config)
    table.check_model(dims)
    torch.manual_seed(0)
    model = model_from_config(config_for(dims, config)).eval()
    layers = dims.num_layers
    speed = table.calibration["latency"]["reference_ms"]
    print(f"{args.table}: {args.precision}, {length} tokens, the unpruned network at {speed:.3f} ms at calibration")
    print("heads  units   raw ms  predicted  measured  drift-corr.  error   per layer (ms)  rounds drift-corr. (ms)")
    worker = Worker()
    try:
        with tempfile.TemporaryDirectory(prefix="nasprune-probe-") as tmp:
            # each graph exported once; each round of a network right after one of the unpruned network
            ref = export_graph(model, Path(tmp) / "reference.onnx", args.precision, target)
            for heads, units in cells:
                net = SubNetwork([heads] * layers, [units] * layers)
                dst = export_graph(slice_model(model, net), Path(tmp) / f"{heads}x{units}.onnx", args.precision,
                                   target)
                got = measure_beside(lambda p: worker.measure(p, target, dims.vocab_size), dst, ref, args.rounds)
                dc, pred = paired_drift_corrected(got, speed), table.predict_latency(net)
                rounds = drift_corrected(got["rounds_ms"], got["reference_rounds_ms"], speed)
                print(f"{heads:5d}  {units:5d}  {table.raw_latency(net):7.3f}  {pred:9.3f}  {got['latency_ms']:8.3f}  "
                      f"{dc:11.3f}  {(dc / pred - 1) * 100:+5.1f}%  {(dc - pred) / layers:+14.3f}  "
                      + " ".join(f"{x:.3f}" for x in rounds), flush=True)
                dst.unlink()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
