#!/usr/bin/env python3
"""How much standard fine-tuning does a task need before pruning methods can be compared on it?

Fine-tunes the default model (all-MiniLM-L6-v2) the standard way on a GLUE task, for each ``LR:EPOCHS`` given,
and prints the dev metric and the wall time. bench_baselines ranks methods by dev metric: on a task where even the
unpruned model stays at the majority class (CoLA MCC 0, MRPC F1 0.81, RTE 0.5), that ranking means nothing.

    python benchmarks/probe_training.py cola --examples 4000 --runs 1e-4:1 3e-5:1 3e-5:3 1e-4:3

Same data settings as bench_baselines (10 % of train held out, seed 0, dev as the test set, batch 16).
"""

from __future__ import annotations

import argparse
import sys
import time


def run_spec(text: str) -> tuple[float, float]:
    try:
        lr, epochs = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LR:EPOCHS (e.g. 1e-4:3)") from None
    if lr <= 0 or epochs <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': learning rate and epochs must be positive")
    return lr, epochs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", help="sst2, mrpc, rte, cola, stsb, ...")
    ap.add_argument("--examples", type=int, default=4000, help="training examples (at most; as bench_baselines)")
    ap.add_argument("--runs", nargs="+", type=run_spec, default=[(1e-4, 1.0), (1e-4, 3.0)], metavar="LR:EPOCHS")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=None, help="GLUE folder (default: NASPRUNE_DATA_DIR or ../shared/data/glue)")
    args = ap.parse_args(argv)

    import torch

    from common import data_dir
    from toolchain.evaluation import score_model as score
    from toolchain.training import fine_tune
    from toolchain.core.data import tokenize
    from toolchain.core.modeling import load_model
    from toolchain.run import DataSettings
    from toolchain.training import TrainConfig

    data = DataSettings(task=args.task, data_dir=args.data_dir or data_dir(), holdout=0.1,
                        max_train_samples=args.examples, seed=0)
    train, dev = data.load("train"), data.load("validation")
    spec = train.spec
    _, tokenizer = load_model(None, num_labels=spec.num_labels, regression=spec.is_regression)
    train_enc, dev_enc = tokenize(train, tokenizer, data.max_length), tokenize(dev, tokenizer, data.max_length)
    print(f"{args.task}: {len(train)} training examples, {len(dev)} dev, metric {spec.metric}", flush=True)
    for lr, epochs in args.runs:
        torch.manual_seed(0)
        model, _ = load_model(None, num_labels=spec.num_labels, regression=spec.is_regression)
        t = time.perf_counter()
        stats = fine_tune(model, train_enc, TrainConfig(strategy="standard", epochs=epochs, batch_size=args.batch_size,
                                                        learning_rate=lr, seed=0), progress=False)
        m = score(model, dev_enc, spec)
        print(f"{args.task} lr {lr:g} epochs {epochs:g} ({stats.get('steps', '?')} steps): dev {spec.metric} "
              f"{m['score']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
