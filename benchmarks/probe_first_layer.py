#!/usr/bin/env python3
"""Does the first layer of a network cost what the others do? Networks of 0, 1, 2 and 3 identical layers, measured
in interleaved rounds.

A latency table's block is what one layer adds to a micro-graph: a one-layer graph minus the zero-layer graph
(:func:`latency_models.assemble.assemble_table`). That difference also carries what the *first* attention layer
changes in the rest of the graph: ONNX Runtime then fuses the embedding into ``(Q)EmbedLayerNormalization`` and
shares the attention mask's casts (``--ops`` lists the operators each layer adds after ONNX Runtime's optimisation),
and a table counts it once per layer, where a network pays it once. What a layer adds after another one is the
second and third layers' increments here. For each ``HEADSxUNITS`` cell the networks ``k x (heads, units)``,
``k = 0..3``, are exported as compile exports them and run in rounds, each round every network ``--runs`` times
(median), one after the other; the increments are taken within each round and their median over the rounds is
printed.

    python benchmarks/probe_first_layer.py [--precision int8] [--length 32] [--cells 1x128,2x0,0x256,12x128]
        [--threads N] [--rounds 40] [--runs 30] [--ops]

Prints one line per cell; nothing is written. On a machine shared with other jobs, run it twice: a difference that
does not repeat is the machine's.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import session_ops  # noqa: E402
from probe_uniform_layers import cell  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="int8", choices=("fp32", "int8"))
    ap.add_argument("--target", default="cpu", help="target name or TOML path")
    ap.add_argument("--length", type=int, default=32, help="sequence length (tokens)")
    ap.add_argument("--cells", default="1x128,2x0,0x256,12x128", help="comma-separated HEADSxUNITS layers")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the target's)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--runs", type=int, default=30, help="runs of each network per round (their median)")
    ap.add_argument("--ops", action="store_true", help="also print each graph's operators after optimisation")
    args = ap.parse_args(argv)
    try:
        cells = [cell(c) for c in args.cells.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))

    import torch

    from latency_models.grid import config_for, export_graph
    from targets import load_target
    from targets.meter import make_feed, time_session
    from targets.session import open_session, session_options
    from toolchain.core.modeling import ModelDims, load_config, model_from_config
    from toolchain.core.slicing import slice_model
    from toolchain.core.subnetwork import SubNetwork

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    target = replace(load_target(args.target), sequence_length=args.length)
    settings = target.settings()
    threads = args.threads or settings["intra_op_threads"]
    _, config = load_config(None)
    dims = ModelDims.from_config(config)
    depths = (0, 1, 2, 3)
    print(f"{args.precision}, {args.length} tokens, {threads} thread(s), {args.rounds} rounds of {args.runs} runs; "
          "ms, median over the rounds of the increment within a round")
    print("cell      T0 (no layer)  1st layer  2nd layer  3rd layer  1st / mean(2nd, 3rd)")
    with tempfile.TemporaryDirectory(prefix="nasprune-probe-") as tmp:
        for heads, units in cells:
            sessions, ops = [], []
            for k in depths:
                torch.manual_seed(0)
                model = model_from_config(config_for(dims, config, num_layers=max(k, 1))).eval()
                sub = SubNetwork((heads,) * k, (units,) * k) if k else SubNetwork((0,), (0,))
                path = export_graph(slice_model(model, sub), Path(tmp) / f"{heads}x{units}-{k}.onnx", args.precision,
                                    target)
                sessions.append(open_session(str(path), settings["providers"], (), threads, "all"))
                if args.ops:  # with the session settings the timing uses
                    ops.append(collections.Counter(session_ops(path, settings["providers"],
                                                               session_options(threads, "all"))))
            feeds = [make_feed([i.name for i in s.get_inputs()], target.batch_size, args.length, dims.vocab_size)
                     for s in sessions]  # the graph without layers does not take the attention mask
            for s, feed in zip(sessions, feeds):  # warm-up
                for _ in range(10):
                    s.run(None, feed)
            rounds = np.zeros((args.rounds, len(depths)))
            for r in range(args.rounds):
                for k, (s, feed) in enumerate(zip(sessions, feeds)):  # the median of exactly --runs runs
                    rounds[r, k] = time_session(s, feed, warmup=0, min_reps=args.runs, min_time_s=0.0,
                                                max_reps=args.runs)["latency_ms"]
            inc = np.median(np.diff(rounds, axis=1), axis=0)
            print(f"{heads:2d}x{units:<5d}  {np.median(rounds[:, 0]):13.4f}  {inc[0]:9.4f}  {inc[1]:9.4f}  "
                  f"{inc[2]:9.4f}  {inc[0] / np.mean(inc[1:]):8.2f}", flush=True)
            if args.ops:
                for k in depths[1:]:
                    added = ops[k] - ops[k - 1]
                    removed = ops[k - 1] - ops[k]
                    print(f"           layer {k} adds {dict(sorted(added.items()))}"
                          + (f", removes {dict(sorted(removed.items()))}" if removed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
