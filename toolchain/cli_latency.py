"""The command-line options of what latency means (:mod:`toolchain.latency_settings`): the sequence length it is
predicted and measured at (``--sequence-length N | data``) and the confidence of the search's latency limit
(``--latency-confidence``); for ``nasprune compile | search | export | profile``."""

from __future__ import annotations

import argparse

from targets import Target, load_target
from toolchain.latency_settings import DEFAULT_LENGTH_QUANTILE, REPORT_LENGTHS, at_length
from toolchain.options import CompileOptions
from toolchain.run import DataSettings


def add_latency_options(p: argparse.ArgumentParser, confidence: bool = True, task: bool = False) -> None:
    """``--sequence-length`` and ``--sequence-length-quantile``; ``confidence``: ``--latency-confidence``;
    ``task`` (``nasprune profile``, which has no data options): the data ``--sequence-length data`` reads."""
    g = p.add_argument_group("latency at your inputs")
    g.add_argument("--sequence-length", default=None, metavar="N|data",
                   help="the sequence length latency is predicted, constrained and measured at (default: the "
                        "target's, 128 for the built-in ones; over a compiled run: the length it was compiled "
                        "at); data: a quantile of the task's tokenized training texts (--sequence-length-quantile), "
                        "rounded up to a multiple of 8, --max-length at most. "
                        "The latency table is profiled (and cached) at that length; every exported point also "
                        f"reports its latency at {', '.join(map(str, REPORT_LENGTHS))} tokens")
    g.add_argument("--sequence-length-quantile", type=float, default=None, metavar="Q",
                   help=f"--sequence-length data: this quantile of the training lengths (default: "
                        f"{DEFAULT_LENGTH_QUANTILE:g}, i.e. p{100 * DEFAULT_LENGTH_QUANTILE:g})")
    if confidence:
        g.add_argument("--latency-confidence", type=float, default=None, metavar="P",
                       help="the search's --max-latency holds for an upper bound of the predicted latency at this "
                            "confidence, e.g. 0.95: the prediction times the upper quantile of measured / predicted "
                            "over the latency table's validation sub-networks (default: the prediction itself)")
    if task:
        g.add_argument("--task", default="sst2", help="--sequence-length data: the GLUE task (default: sst2)")
        g.add_argument("--data-dir", default=None, help="--sequence-length data: GLUE-format data folder")
        g.add_argument("--max-length", type=int, default=128, help="--sequence-length data: the cap (default: 128)")


def latency_options(args) -> dict:
    """The :class:`CompileOptions` fields of :func:`add_latency_options`."""
    return {"sequence_length": args.sequence_length, "sequence_length_quantile": args.sequence_length_quantile,
            "latency_confidence": getattr(args, "latency_confidence", None)}


def targets_at_length(names: list[str], args) -> list[Target | str]:
    """``nasprune profile``: the targets at ``--sequence-length`` (``data``: of ``--task``, chosen once, printed)."""
    if args.sequence_length is None:
        return names
    opts = CompileOptions(model=args.model, data=DataSettings(task=args.task, data_dir=args.data_dir,
                                                              max_length=args.max_length), **latency_options(args))
    first = opts.resolved_target(names[0])
    return [first] + [at_length(load_target(t), first.sequence_length) for t in names[1:]]
