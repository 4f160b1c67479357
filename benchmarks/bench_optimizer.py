"""Recovery with AdamW fused or per tensor: the same result, how much faster (issue: accurate at speed, fit it in time).

torch's AdamW on a CPU loops over the parameters one tensor at a time unless told otherwise; the project builds it
fused (:func:`toolchain.training.optimizer_and_schedule`). For sub-networks of a trained super-network (uniform
shares of every layer's heads and FFN units), one recovery (:func:`toolchain.recover.recover_point`, default
settings) with each optimizer, alternating, ``--rounds`` times: seconds (median), the recovered dev metric and the
final loss of each.

    python benchmarks/bench_optimizer.py --run ~/.cache/nasprune/supernets/<key> [--ratios 0.5] [--rounds 2]
                                         [--samples 12000] [--no-docs]

Each recovery starts afresh (its cached result is removed first); the teacher's logits are computed once beforehand.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, publish  # noqa: E402

VARIANTS = {"fused": True, "per tensor": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder (or a compile's cached super-network)")
    ap.add_argument("--ratios", default="0.5", help="uniform shares of heads and units of the points")
    ap.add_argument("--samples", type=int, default=12000, help="training texts per recovery (the default preset's)")
    ap.add_argument("--rounds", type=int, default=2, help="recoveries per optimizer and point, alternating")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    import toolchain.recover as recover
    from toolchain.core.subnetwork import uniform_subnet
    from toolchain.recover import RecoverSettings, point_dir, recover_point, teacher_logits
    from toolchain.run import load_run
    from toolchain.training import optimizer_and_schedule

    run = load_run(args.run)
    settings = RecoverSettings(samples=args.samples)
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-optimizer-"))
    teacher_logits(run, settings, cache_dir=work, progress=False)  # once, not timed
    full_params = run.space.num_parameters(run.supernet.full())
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        subnet = uniform_subnet(run.supernet.dims, ratio)
        got: dict = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name, fused in VARIANTS.items():
                recover.optimizer_and_schedule = partial(optimizer_and_schedule, fused=fused)
                shutil.rmtree(point_dir(run, subnet, settings, cache_dir=work), ignore_errors=True)  # ours: again
                i = recover_point(run, subnet, settings, cache_dir=work, progress=False).info
                got[name].append(i)
                print(f"ratio {ratio:.2f}, {name}, round {r + 1}: {i['seconds']:.1f} s, {i['metric']} "
                      f"{i['score_after']:.4f}, final loss {i['final_loss']:.6f}", flush=True)
        recover.optimizer_and_schedule = optimizer_and_schedule
        secs = {name: statistics.median(i["seconds"] for i in got[name]) for name in VARIANTS}
        for name in VARIANTS:
            i = got[name][0]
            rows.append([f"uniform {ratio:.2f}", f"{run.space.num_parameters(subnet) / full_params:.0%}", name,
                         " / ".join(f"{x['seconds']:.0f}" for x in got[name]), f"{secs[name]:.0f}",
                         f"{secs['per tensor'] / secs[name]:.2f}x", f"{i['score_after']:.4f}",
                         f"{i['final_loss']:.6f}"])
    md = ["## Recovery: AdamW fused or per tensor (`bench_optimizer.py`)", "",
          f"`python benchmarks/bench_optimizer.py --run <super-network> --ratios {args.ratios} --samples "
          f"{args.samples} --rounds {args.rounds}`. Machine: {machine()}. Super-network: {run.data.describe()}; points: the "
          "same share of heads and FFN units in every layer; one recovery per optimizer and round (default "
          "settings: KL to the full network's logits + labels, lr 1e-4, batch 32, one epoch), the two alternating; "
          "seconds of each round, their median, the speed-up over the per-tensor loop, and the first round's "
          "recovered dev metric and final loss (the mean of the last 20 steps).", ""]
    md += markdown_table(["point (share)", "parameters", "AdamW", "seconds per round", "median s", "speed-up",
                          "metric after", "final loss"], rows, right={1, 3, 4, 5, 6, 7})
    publish("bench_optimizer", md, write=not args.no_docs)


if __name__ == "__main__":
    main()
