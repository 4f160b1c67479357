"""Weight-sharing strategies on SST-2 (issue: super-network).

Trains the default MiniLM super-network (MEDIUM space) on a seeded SST-2 training subset with `standard`, `sandwich`
and `kd`, then evaluates on the full SST-2 dev set (872): the full network, the smallest member, and 20 random
sub-networks (median, min, max). The paper's finding: standard fine-tuning leaves small sub-networks near chance,
sandwich/kd keeps them useful.

    python benchmarks/bench_supernet.py [--max-train-samples 4000] [--strategies standard,sandwich,kd]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import data_dir, machine, stats, write_section
from toolchain.evaluation import Evaluator
from toolchain.run import DataSettings, train_run
from toolchain.training import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-train-samples", type=int, default=4000)
    ap.add_argument("--strategies", default="standard,sandwich,kd")
    ap.add_argument("--random", type=int, default=20)
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for strategy in args.strategies.split(","):
        data = DataSettings(task="sst2", data_dir=data_dir(), max_train_samples=args.max_train_samples, seed=args.seed)
        t = time.time()
        run = train_run(f"{args.runs}/sst2-{strategy}-{args.max_train_samples}", data=data, space="medium",
                        train_config=TrainConfig(strategy=strategy, epochs=1, seed=args.seed))
        train_s = run.settings.get("train_stats", {}).get("seconds", time.time() - t)
        ev = Evaluator(run.supernet, run.encoded("validation"), run.spec, param_count=run.space.num_parameters)
        rng = np.random.default_rng(1234)  # the same 20 random sub-networks for every strategy
        randoms = [run.space.sample(rng) for _ in range(args.random)]
        full, small = ev(run.space.largest())["accuracy"], ev(run.space.smallest())["accuracy"]
        rand = stats([ev(s)["accuracy"] for s in randoms])
        rows.append((strategy, train_s, full, small, rand))
        print(f"{strategy:9s} train {train_s:6.0f}s  full {full:.3f}  smallest {small:.3f}  "
              f"random median {rand['median']:.3f} (min {rand['min']:.3f}, max {rand['max']:.3f})", flush=True)
    md = ["## Super-network training strategies (SST-2)\n",
          f"`python benchmarks/bench_supernet.py --max-train-samples {args.max_train_samples} "
          f"--strategies {args.strategies}` -- MiniLM-L6 "
          f"super-network, MEDIUM space, 1 epoch on a seeded {args.max_train_samples}-example SST-2 training subset, "
          f"evaluated on the full SST-2 dev set (872). Random = the same {args.random} uniformly sampled sub-networks "
          f"for every strategy. Machine: {machine()}.\n",
          "| strategy | train time (s) | full network acc. | smallest acc. | random sub-networks acc. median (min-max) |",
          "| --- | ---: | ---: | ---: | --- |"]
    for strategy, train_s, full, small, r in rows:
        md.append(f"| {strategy} | {train_s:.0f} | {full:.3f} | {small:.3f} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) |")
    write_section("bench_supernet", "\n".join(md))


if __name__ == "__main__":
    main()
