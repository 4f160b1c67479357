"""Helpers shared by the benchmark scripts: data location, figure statistics, writing docs/benchmarks.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def data_dir() -> str:
    d = os.environ.get("NASPRUNE_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "glue")
    if not Path(d, "SST-2", "train.tsv").is_file():
        sys.exit(f"GLUE data not found in {d}; set NASPRUNE_DATA_DIR")
    return d


def table_path(out_dir, dims, target_name: str, precision: str) -> Path:
    """Where ``bench_latency.py`` writes the latency table of a model family, target and precision."""
    return Path(out_dir) / f"{dims.model_type}-{dims.hidden_size}-{target_name}-{precision}.json"


def session_ops(path, providers=("CPUExecutionProvider",), options=None) -> dict[str, int]:
    """The operators of the ONNX model ``path`` after an ONNX Runtime session with ``options`` (default: ORT's
    defaults) and ``providers`` optimized it (the optimized graph is written beside it, ``.session.onnx``)."""
    import onnxruntime as ort

    from toolchain.onnx.build import count_ops

    options = options or ort.SessionOptions()
    options.optimized_model_filepath = str(Path(path).with_suffix(".session.onnx"))
    ort.InferenceSession(str(path), options, providers=list(providers))
    return count_ops(options.optimized_model_filepath)


def stats(values) -> dict:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1]}


def machine() -> str:
    import onnxruntime
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    DOCS.parent.mkdir(exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nEvery figure here is printed by a script in `benchmarks/`.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def markdown_table(columns: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    """The lines of a markdown table: ``columns`` as the header, ``rows`` as text (``right``: right-aligned
    column numbers)."""
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(columns))) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def publish(name: str, lines: list[str], write: bool = True) -> str:
    """Print a benchmark's markdown and (``write``) make it the ``name`` section of docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(name, text)
    return text


def front_records(front: str | Path, keys: list[str]) -> dict:
    """The records of a compile's ``pareto.json`` named by ``keys``, by key (exits naming those not on it)."""
    import json

    records = {r["key"]: r for r in json.loads(Path(front).read_text())["pareto"]}
    missing = [k for k in keys if k not in records]
    if missing:
        sys.exit(f"not on the front {front}: {', '.join(missing)}")
    return {k: records[k] for k in keys}


def section_argument(ap, name: str) -> None:
    """``--section S``: write the docs section ``name-S`` instead of ``name`` (another run beside the first)."""
    ap.add_argument("--section", default="", help=f"write docs section {name}-SECTION instead of {name} (another "
                    "run beside the first)")


def docs_arguments(ap, name: str) -> None:
    """``--section S`` (:func:`section_argument`) and ``--no-docs`` (print only)."""
    section_argument(ap, name)
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")


def table_arguments(ap, name: str) -> None:
    """``--table T.json`` (repeatable) and :func:`docs_arguments`: the benchmarks that refit stored tables."""
    ap.add_argument("--table", action="append", required=True, help="a latency table (JSON; repeatable)")
    docs_arguments(ap, name)


def stored_calibration(table):
    """``(calibration samples, held-out validation samples, reference_ms)`` of a table's latency (or of a view at
    one length): what a refit needs (the unpruned anchor last among the samples, the reference's undisturbed latency);
    ``None`` where the table lacks any of it."""
    cal = table.calibration.get("latency") or {}
    samples, held = cal.get("samples") or [], (table.validation.get("latency") or {}).get("samples") or []
    speed = cal.get("reference_ms")
    if not held or not speed or not samples or not samples[-1].get("reference"):
        return None
    return samples, held, speed


def refit_latency(table, samples: list[dict], weights: list[float]):
    """A copy of ``table`` with its latency calibration refitted (degree 2, as :meth:`calibrate_from` fits) on
    stored calibration ``samples`` (``raw``, ``measured``), each counting as its ``weights``."""
    import copy

    trial = copy.deepcopy(table)
    trial.set_calibration("latency", [s["raw"] for s in samples], [s["measured"] for s in samples], degree=2,
                          weights=weights)
    return trial


def recalibrated(table, samples: list[dict]):
    """A copy of ``table`` with its latency calibration refitted (degree 2, as :meth:`calibrate_from` fits) on stored
    calibration ``samples`` (``subnet``, ``measured``, ``weight`` where not 1), against this table's own raw sums: its
    grid rebuilt, or another table's samples."""
    import copy

    from toolchain.core.subnetwork import SubNetwork

    trial = copy.deepcopy(table)
    trial.set_calibration("latency", [trial.raw_latency(SubNetwork.from_dict(s["subnet"])) for s in samples],
                          [s["measured"] for s in samples], degree=2, weights=[s.get("weight", 1.0) for s in samples])
    return trial


def held_out_errors(table, held, speed: float) -> list[float]:
    """``table``'s relative error on each held-out validation sample, its measurement drift-corrected to ``speed``
    (the reference's undisturbed latency), as the compile compares."""
    from latency_models.lookup_table import residuals_of
    from toolchain.core.subnetwork import SubNetwork

    return residuals_of([{**s, "predicted": table.predict_latency(SubNetwork.from_dict(s["subnet"]))} for s in held],
                        speed)[0]


def section_name(name: str, section: str) -> str:
    """The docs section of a benchmark run with ``--section section`` (:func:`section_argument`)."""
    return name + (f"-{section}" if section else "")


def dev_halves(run, seed: int = 0):
    """The run's dev set (``MetricData``) and ``scores(predictions) -> (half A, half B, whole)``: the task metric on
    a seeded split of it in two halves (choose on one, check on the other) and on all of it."""
    import numpy as np

    from toolchain.ship.verify import MetricData

    dev = MetricData.from_dataset(run.data.load("validation"), run.tokenizer, run.data.max_length)
    order = np.random.default_rng(seed).permutation(len(dev))
    parts = (np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:]), np.arange(len(dev)))

    def scores(preds) -> tuple[float, float, float]:
        return tuple(float(dev.metric(preds[i], dev.labels[i])["score"]) for i in parts)

    return dev, scores


def front_arguments(ap) -> None:
    """The arguments of a benchmark over points of a compile's front: ``--run``, ``--front``, ``--keys``,
    ``--split-seed`` (:func:`dev_halves`) and ``--no-docs``."""
    ap.add_argument("--run", required=True, help="a compile's cached super-network (or a trained run folder)")
    ap.add_argument("--front", required=True, help="pareto.json of a compile of that super-network")
    ap.add_argument("--keys", required=True, help="comma-separated sub-network keys of the front")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the dev set's split in two halves")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
