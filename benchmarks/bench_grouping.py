"""Length-grouped batches: what they save in training and recovery, and what they change (issue: accurate at speed).

Trains the default super-network (the default compile's: all-MiniLM-L6-v2, MEDIUM space, kd, one epoch on a seeded
6000-example SST-2 training subset) twice, with random batches and with length-grouped batches
(``TrainConfig.group_by_length``, transformers' ``get_length_grouped_indices``), and recovers one point of the
grouped super-network both ways (``RecoverSettings.group_by_length``, 6000 texts). Reports wall seconds, the padded
tokens the batches hold (the work; free of the machine's noise), and SST-2 dev accuracy: the full network, the
smallest, 10 random sub-networks (the same for both), and the recovered point.

    python benchmarks/bench_grouping.py [--max-train-samples 6000] [--recover-samples 6000] [--no-docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, machine, markdown_table, publish, stats  # noqa: E402


def padded_tokens(encoded, batch_size: int, grouped: bool, seed: int) -> int:
    """Tokens (padding included) in one epoch of batches, as training draws them."""
    import torch

    from toolchain.core.data import batches

    return sum(b["input_ids"].numel() for b in batches(encoded, batch_size, shuffle=True, group_by_length=grouped,
                                                         generator=torch.Generator().manual_seed(seed)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-train-samples", type=int, default=6000)
    ap.add_argument("--recover-samples", type=int, default=6000)
    ap.add_argument("--random", type=int, default=10, help="random sub-networks evaluated on dev")
    ap.add_argument("--ratio", type=float, default=0.5, help="uniform share of heads and units of the recovered point")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    import numpy as np
    import torch

    from toolchain.core.data import tokenize
    from toolchain.core.subnetwork import uniform_subnet
    from toolchain.evaluation import Evaluator
    from toolchain.recover import RecoverSettings, recover_point, recovery_data, teacher_logits
    from toolchain.run import DataSettings, train_run
    from toolchain.training import TrainConfig

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-grouping-"))
    data = DataSettings(task="sst2", data_dir=data_dir(), max_train_samples=args.max_train_samples, seed=0)
    rows, runs = [], {}
    for grouped in (False, True):
        cfg = TrainConfig(strategy="kd", epochs=1, seed=0, group_by_length=grouped)
        t = time.perf_counter()
        run = train_run(work / f"supernet-{'grouped' if grouped else 'random'}", data=data, space="medium",
                        train_config=cfg, progress=False)
        train_s = time.perf_counter() - t
        runs[grouped] = run
        tokens = padded_tokens(run.encoded("train"), cfg.batch_size, grouped, cfg.seed)
        ev = Evaluator(run.supernet, run.encoded("validation"), run.spec, param_count=run.space.num_parameters)
        rng = np.random.default_rng(1234)
        randoms = stats([ev(s)["accuracy"] for s in [run.space.sample(rng) for _ in range(args.random)]])
        full, small = ev(run.space.largest())["accuracy"], ev(run.space.smallest())["accuracy"]
        spread = f"{randoms['median']:.4f} ({randoms['min']:.4f}-{randoms['max']:.4f})"
        rows.append(["super-network training", "grouped" if grouped else "random", f"{train_s:.0f}", f"{tokens:,}",
                     f"{full:.4f}", f"{small:.4f}", spread])
        print(" | ".join(rows[-1]), flush=True)
    run = runs[True]
    subnet = uniform_subnet(run.supernet.dims, args.ratio)
    for grouped in (False, True):
        settings = RecoverSettings(samples=args.recover_samples, group_by_length=grouped)
        cache = work / f"recover-{'grouped' if grouped else 'random'}"
        teacher_logits(run, settings, cache_dir=cache, progress=False)  # timed apart: the same either way
        point = recover_point(run, subnet, settings, cache_dir=cache, progress=False)
        i = point.info
        tokens = padded_tokens(tokenize(recovery_data(run, settings), run.tokenizer, run.data.max_length),
                               settings.batch_size, grouped, settings.seed)
        change = f"{i['score_before']:.4f} -> {i['score_after']:.4f}"
        rows.append([f"recovery of a point (uniform {args.ratio:.2f})", "grouped" if grouped else "random",
                     f"{i['seconds']:.0f}", f"{tokens:,}", change, "", ""])
        print(" | ".join(rows[-1]), flush=True)
    md = ["## Length-grouped batches (`bench_grouping.py`)", "",
          f"`python benchmarks/bench_grouping.py --max-train-samples {args.max_train_samples} --recover-samples "
          f"{args.recover_samples}`. Machine: {machine()}. The default compile's super-network (all-MiniLM-L6-v2, "
          f"MEDIUM space, kd, one epoch, batch 32) on a seeded {args.max_train_samples}-example SST-2 subset, trained "
          "with random batches and with length-grouped ones (transformers' `get_length_grouped_indices`: random "
          "order, sorted by length within mega-batches of 50 batches); then one point of the grouped super-network "
          f"recovered both ways on {args.recover_samples} texts. Accuracy: SST-2 dev (872); random sub-networks: the "
          f"same {args.random} for both. Padded tokens: what one epoch of batches holds (deterministic). Seconds: "
          "wall time, one run each on a shared machine.", ""]
    md += markdown_table(["stage", "batches", "seconds", "padded tokens", "full network (or point before -> after)",
                          "smallest", "random sub-networks median (min-max)"], rows, right={2, 3})
    publish("bench_grouping", md, write=not args.no_docs)


if __name__ == "__main__":
    main()
