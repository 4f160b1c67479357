"""Tasks, data loading, tokenization and metrics.

Two sources of labelled text:

* the nine GLUE tasks (:data:`TASKS`), read from a local GLUE-format folder (``<data_dir>/SST-2/dev.tsv``, ...) given
  as an argument or through ``NASPRUNE_DATA_DIR``, else from the Hugging Face hub (``nyu-mll/glue``, needs network);
* custom CSV / TSV / JSONL files with one or two text columns and a label column (:func:`load_custom`).

Both give a :class:`TextDataset`; :func:`tokenize` turns it into padded tensors and :func:`batches` walks them with
per-batch dynamic padding. :func:`compute_metrics` reports the GLUE metrics, with the task's official one as ``score``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA_DIR_ENV = "NASPRUNE_DATA_DIR"
GLUE_HUB_ID = "nyu-mll/glue"
METRICS = ("accuracy", "f1", "matthews", "spearman")
SPLITS = ("train", "validation")


class DataError(ValueError):
    """Data that cannot be loaded or used, with a message for the user."""


@dataclass
class TaskSpec:
    """What a model head, the training loop and the metrics need to know of a task."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 for regression
    is_regression: bool
    metric: str  # the official main metric, one of METRICS
    label_names: list[str] | None = None  # label id -> name (None: plain integer labels, or regression)


# GLUE tasks; text_columns are the column names of the hub dataset, label ids follow its ClassLabel order.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", ("sentence",), 2, False, "accuracy", ["negative", "positive"]),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, False, "f1", ["not_equivalent", "equivalent"]),
        TaskSpec("rte", ("sentence1", "sentence2"), 2, False, "accuracy", ["entailment", "not_entailment"]),
        TaskSpec("cola", ("sentence",), 2, False, "matthews", ["unacceptable", "acceptable"]),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, True, "spearman", None),
        TaskSpec("qnli", ("question", "sentence"), 2, False, "accuracy", ["entailment", "not_entailment"]),
        TaskSpec("wnli", ("sentence1", "sentence2"), 2, False, "accuracy", ["not_entailment", "entailment"]),
        TaskSpec("mnli", ("premise", "hypothesis"), 3, False, "accuracy", ["entailment", "neutral", "contradiction"]),
        TaskSpec("qqp", ("question1", "question2"), 2, False, "f1", ["not_duplicate", "duplicate"]),
    )
}


@dataclass(frozen=True)
class _GlueLayout:
    """Where a task lives in the GLUE-format folder and which TSV columns hold its texts and label."""

    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    header: tuple[str, ...] | None = None  # column names, for files without a header row
    dev_file: str = "dev.tsv"


_GLUE_LAYOUT: dict[str, _GlueLayout] = {
    "sst2": _GlueLayout("SST-2", ("sentence",), "label"),
    "mrpc": _GlueLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "rte": _GlueLayout("RTE", ("sentence1", "sentence2"), "label"),
    "cola": _GlueLayout("CoLA", ("sentence",), "label", header=("source", "label", "original_label", "sentence")),
    "stsb": _GlueLayout("STS-B", ("sentence1", "sentence2"), "score"),
    "qnli": _GlueLayout("QNLI", ("question", "sentence"), "label"),
    "wnli": _GlueLayout("WNLI", ("sentence1", "sentence2"), "label"),
    "mnli": _GlueLayout("MNLI", ("sentence1", "sentence2"), "gold_label", dev_file="dev_matched.tsv"),
    "qqp": _GlueLayout("QQP", ("question1", "question2"), "is_duplicate"),
}


@dataclass
class TextDataset:
    """Texts (one tuple of 1 or 2 strings per example) and labels (int64 class ids, or float32 for regression)."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray
    spec: TaskSpec
    source: str  # file path or hub address, for messages and reports

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels ({self.source})")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.spec, self.source)

    def sample(self, n: int | None, seed: int = 0) -> TextDataset:
        """A seeded random subset of ``n`` examples, kept in file order (for a fixed seed, a smaller sample is part
        of a larger one); the whole dataset when ``n`` is ``None`` or not smaller than it."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"a sample size must be positive, got {n}")
        return self.subset(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def split(self, fraction: float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
        """A seeded random split into (rest, held_out), ``held_out`` holding ``fraction`` of the examples.

        Both parts keep the original order; the same seed gives the same split.
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"split fraction must be in (0, 1), got {fraction}")
        n = len(self)
        n_held = int(round(n * fraction))
        if not 0 < n_held < n:
            raise DataError(f"cannot hold out {fraction:.0%} of {n} examples ({self.source})")
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(perm[n_held:])), self.subset(np.sort(perm[:n_held]))


# --------------------------------------------------------------------------------------------------- GLUE tasks


def get_task(task: str) -> TaskSpec:
    """The GLUE task spec for a name such as ``sst2``, ``SST-2`` or ``sts-b``."""
    key = re.sub(r"[-_\s]", "", task.lower())
    if key not in TASKS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)} (or use custom data files)")
    return TASKS[key]


def load_task(
    task: str,
    split: str = "validation",
    data_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> TextDataset:
    """Load a GLUE task's ``train`` or ``validation`` split (``dev`` is accepted for the latter).

    Data comes from ``data_dir``, else from ``$NASPRUNE_DATA_DIR``, else from the Hugging Face hub. ``max_samples``
    keeps a seeded random subset (in file order); for a fixed seed a smaller subset is part of a larger one.
    """
    spec = get_task(task)
    split = "validation" if split == "dev" else split
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    dataset = _load_glue_local(spec, split, Path(root)) if root else _load_glue_hub(spec, split)
    return dataset.sample(max_samples, seed)


def _load_glue_local(spec: TaskSpec, split: str, root: Path) -> TextDataset:
    layout = _GLUE_LAYOUT[spec.name]
    folder = root / layout.folder
    if not folder.is_dir():
        raise DataError(
            f"GLUE folder for task {spec.name!r} not found: {folder} "
            f"(expected <data_dir>/{layout.folder}/{{train.tsv,{layout.dev_file}}})"
        )
    path = folder / ("train.tsv" if split == "train" else layout.dev_file)
    if not path.is_file():
        raise DataError(f"no {split} split for task {spec.name!r}: file not found: {path}")
    texts, raw, lines = _read_columns(path, layout.text_columns, layout.label_column, header=layout.header)
    labels, _ = _encode_labels(raw, lines, path, spec.is_regression, spec.label_names)
    return TextDataset(texts, labels, spec, str(path))


def _load_glue_hub(spec: TaskSpec, split: str) -> TextDataset:
    hub_split = "validation_matched" if spec.name == "mnli" and split == "validation" else split
    try:
        from datasets import load_dataset

        ds = load_dataset(GLUE_HUB_ID, spec.name, split=hub_split)
    except Exception as e:  # network, offline mode, missing cache, ...: all mean "give me a local folder"
        raise DataError(
            f"could not load GLUE task {spec.name!r} ({hub_split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Without network, pass --data-dir or set {DATA_DIR_ENV} to a local GLUE "
            f"folder (<dir>/SST-2/dev.tsv, <dir>/MRPC/train.tsv, ...)"
        ) from e
    texts = list(zip(*(map(str, ds[c]) for c in spec.text_columns)))
    labels = np.asarray(list(ds["label"]), dtype=np.float32 if spec.is_regression else np.int64)
    return TextDataset(texts, labels, spec, f"hf://{GLUE_HUB_ID}/{spec.name}/{hub_split}")


# -------------------------------------------------------------------------------------------------- custom data


def load_custom(
    path: str | os.PathLike,
    text_columns: str | Sequence[str],
    label_column: str = "label",
    is_regression: bool = False,
    label_names: Sequence[str] | None = None,
    *,
    name: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> TextDataset:
    """Load a CSV (``.csv``), TSV (``.tsv``, no quoting) or JSON-lines (``.jsonl`` / ``.json``) file.

    Classification labels may be integers (used as ids) or strings (mapped to ids in sorted order; the mapping is
    the spec's ``label_names``). Pass the training file's ``spec.label_names`` when loading its validation file so
    both use the same ids. With ``is_regression`` the labels are floats and the metric is Spearman correlation.
    """
    path = Path(path)
    columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if len(columns) not in (1, 2):
        raise DataError(f"need one or two text columns, got {len(columns)}: {columns}")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    texts, raw, lines = _read_columns(path, columns, label_column)
    if not texts:
        raise DataError(f"{path}: no examples")
    labels, names = _encode_labels(raw, lines, path, is_regression, list(label_names) if label_names else None)
    if is_regression:
        num_labels = 1
    else:
        num_labels = len(names) if names else int(labels.max()) + 1
    spec = TaskSpec(
        name=name or path.stem,
        text_columns=columns,
        num_labels=max(num_labels, 1 if is_regression else 2),
        is_regression=is_regression,
        metric="spearman" if is_regression else "accuracy",
        label_names=names,
    )
    return TextDataset(texts, labels, spec, str(path)).sample(max_samples, seed)


def _read_columns(
    path: Path, text_columns: Sequence[str], label_column: str, header: Sequence[str] | None = None
) -> tuple[list[tuple[str, ...]], list[Any], list[int]]:
    """Texts, raw labels and line numbers of the rows of a CSV / TSV / JSONL file (a UTF-8 BOM is dropped)."""
    wanted = [*text_columns, label_column]
    texts: list[tuple[str, ...]] = []
    raw: list[Any] = []
    lines: list[int] = []

    def check_columns(available: Sequence[str]) -> None:
        missing = [c for c in wanted if c not in available]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                f"columns in the file: {', '.join(map(repr, available))}"
            )

    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() in (".jsonl", ".json"):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line")
                check_columns(list(record))
                texts.append(tuple("" if record[c] is None else str(record[c]) for c in text_columns))
                raw.append(record[label_column])
                lines.append(line_no)
            return texts, raw, lines

        if path.suffix.lower() == ".tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE quotes are text, not quoting
        else:
            reader = csv.reader(f)
        columns = list(header) if header else next(reader, [])
        check_columns(columns)
        index = [columns.index(c) for c in wanted]
        for row in reader:
            if not row or row == [""]:
                continue
            if len(row) != len(columns):
                raise DataError(f"{path}:{reader.line_num}: expected {len(columns)} fields, found {len(row)}")
            values = [row[i] for i in index]
            texts.append(tuple(values[:-1]))
            raw.append(values[-1])
            lines.append(reader.line_num)
    return texts, raw, lines


def _as_int(value: Any) -> int | None:
    """``value`` as an integer label, or None when it is not one (bools and fractional numbers are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _encode_labels(
    raw: list[Any], lines: list[int], path: Path, is_regression: bool, label_names: list[str] | None
) -> tuple[np.ndarray, list[str] | None]:
    """Label array (float32 or int64) and the label names it uses (given, derived from strings, or None)."""
    for value, line in zip(raw, lines):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}:{line}: missing label")
    if is_regression:
        out = np.empty(len(raw), dtype=np.float32)
        for i, (value, line) in enumerate(zip(raw, lines)):
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {value!r} is not a number (regression task)") from None
        return out, None

    if label_names is None:
        ints = [_as_int(v) for v in raw]
        if all(v is not None and v >= 0 for v in ints):
            return np.asarray(ints, dtype=np.int64), None
        label_names = sorted({str(v).strip() for v in raw})
    ids = {name: i for i, name in enumerate(label_names)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, (value, line) in enumerate(zip(raw, lines)):
        label = ids.get(str(value).strip())
        if label is None:
            label = _as_int(value)
            if label is None or not 0 <= label < len(label_names):
                raise DataError(f"{path}:{line}: unknown label {value!r}; known labels: {label_names}")
        out[i] = label
    return out, label_names


# -------------------------------------------------------------------------------------------- tokenize / batches


def tokenize(dataset: TextDataset, tokenizer, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize (truncating to ``max_length``, padding to the longest example) into tensors.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them) and ``labels``.
    """
    if len(dataset) == 0:
        raise DataError(f"nothing to tokenize: empty dataset ({dataset.source})")
    columns = [list(c) for c in zip(*dataset.texts)]
    enc = tokenizer(*columns, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.from_numpy(dataset.labels)
    return out


def batches(
    encoded: dict[str, torch.Tensor],
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of ``encoded``, each trimmed to the columns its attention mask uses (dynamic padding).

    Works for right and left padding. ``shuffle`` draws the order from ``generator`` (seed it to reproduce).
    ``group_by_length`` (with ``shuffle``) draws it with transformers' ``get_length_grouped_indices`` (what the
    Trainer's ``group_by_length`` does): a random order, sorted by length within mega-batches of 50 batches, so that
    a batch holds texts of similar length and pads little (SST-2, batch 32: 2.9x fewer tokens than random batches).
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    mask = encoded["attention_mask"]
    n, seq_len = mask.shape
    order = None
    if shuffle and group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = torch.tensor(get_length_grouped_indices(mask.sum(dim=1).tolist(), batch_size, generator=generator))
    elif shuffle:
        order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        used = mask[rows].any(dim=0).nonzero()
        cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 1)
        yield {
            k: v[rows][:, cols] if v.dim() == 2 and v.shape[1] == seq_len else v[rows] for k, v in encoded.items()
        }


# ------------------------------------------------------------------------------------------------------ metrics


def compute_metrics(
    spec_or_metric: TaskSpec | str, predictions: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """Task metrics from logits ``(N, C)`` or class ids ``(N,)`` (regression: scores ``(N,)`` or ``(N, 1)``).

    ``spec_or_metric`` is a :class:`TaskSpec`, a GLUE task name, or a metric name (one of :data:`METRICS`).
    Classification gives ``accuracy`` (+ ``f1`` of class 1, or ``matthews``, when that is the main metric);
    regression gives ``pearson`` and ``spearman``. ``score`` is the main metric. Undefined correlations
    (constant inputs) count as 0.
    """
    from sklearn.metrics import f1_score, matthews_corrcoef

    if isinstance(spec_or_metric, TaskSpec):
        metric, regression = spec_or_metric.metric, spec_or_metric.is_regression
    elif spec_or_metric in METRICS:
        metric, regression = spec_or_metric, spec_or_metric == "spearman"
    else:
        spec = get_task(spec_or_metric)
        metric, regression = spec.metric, spec.is_regression
    preds = np.asarray(predictions.detach().cpu() if isinstance(predictions, torch.Tensor) else predictions)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(preds) != len(y):
        raise DataError(f"{len(preds)} predictions but {len(y)} labels")

    if regression:
        scores = preds.reshape(len(y), -1)
        if scores.shape[1] != 1:
            raise DataError(f"regression needs one score per example, got shape {preds.shape}")
        out = {kind: _correlation(scores[:, 0], y, kind) for kind in ("pearson", "spearman")}
    else:
        ids = preds.argmax(axis=1) if preds.ndim == 2 else preds.astype(np.int64)
        y = y.astype(np.int64)
        out = {"accuracy": float(np.mean(ids == y)) if len(y) else 0.0}
        if metric == "f1":  # binary F1 of class 1 (0 when there are no positives at all)
            out["f1"] = float(f1_score(y, ids, pos_label=1, average="binary", zero_division=0))
        elif metric == "matthews":  # 0 when undefined
            out["matthews"] = float(matthews_corrcoef(y, ids))
    out["score"] = out[metric]
    return out


def _correlation(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    from scipy import stats

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(x.astype(np.float64), y.astype(np.float64))[0])
