#!/usr/bin/env python3
"""A custom CSV dataset for the benchmarks: a user's two files (train.csv, dev.csv), made from labelled GLUE data.

The benchmarks compare methods on SST-2, MRPC and STS-B through the GLUE loaders; this writes what a user brings
instead: plain CSV files (quoted as Python's ``csv`` module quotes them) with named text columns and string labels,
which ``nasprune-compile --train-file ... --validation-file ... --text-columns ... --label-column label`` reads. The
default is QNLI (question / sentence pairs, ``entailment`` / ``not_entailment``): only its labelled dev split is in
the shared data, so its rows are shuffled (``--seed``) and split into ``--dev-rows`` for dev.csv and the rest for
train.csv.

    python benchmarks/custom_csv.py --out /tmp/qnli-csv [--task qnli] [--dev-rows 1000] [--seed 0]

Writes into ``--out`` (created if missing; existing train.csv / dev.csv there are not overwritten).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for train.csv and dev.csv")
    ap.add_argument("--task", default="qnli", help="GLUE task whose labelled dev split is used (default: qnli)")
    ap.add_argument("--dev-rows", type=int, default=1000, help="rows of dev.csv (default: 1000); the rest: train.csv")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    ap.add_argument("--data-dir", default=os.environ.get("NASPRUNE_DATA_DIR"), help="GLUE folder (default: "
                    "NASPRUNE_DATA_DIR)")
    args = ap.parse_args(argv)

    from toolchain.core.data import TASKS, load_task

    out = Path(args.out)
    files = [out / "train.csv", out / "dev.csv"]
    if existing := [str(f) for f in files if f.exists()]:
        ap.error(f"{', '.join(existing)} already there; choose another --out")
    if args.task not in TASKS:
        ap.error(f"unknown task '{args.task}' (known: {', '.join(TASKS)})")
    ds = load_task(args.task, split="validation", data_dir=args.data_dir)
    if not 0 < args.dev_rows < len(ds):
        ap.error(f"--dev-rows must be between 1 and {len(ds) - 1} ({args.task} has {len(ds)} labelled rows)")
    spec = ds.spec
    columns = list(TASKS[args.task].text_columns)
    order = np.random.default_rng(args.seed).permutation(len(ds))
    parts = {files[1]: order[: args.dev_rows], files[0]: order[args.dev_rows:]}
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in parts.items():
        with open(path, "x", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*columns, "label"])
            for i in rows:
                label = spec.label_names[int(ds.labels[i])] if spec.label_names else ds.labels[i].item()
                w.writerow([*ds.texts[i], label])
        print(f"{path}: {len(rows)} rows")
    print(f"columns: --text-columns {','.join(columns)} --label-column label")
    return 0


if __name__ == "__main__":
    sys.exit(main())
