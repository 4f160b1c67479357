"""What a compile's latency figures mean: the sequence length they are at (``--sequence-length N | data``), the
other lengths every exported point reports, and the unpruned reference each export is measured beside.

* :func:`sequence_length_for`: ``N``, or ``data`` = a quantile (default p95) of the task's tokenized training
  lengths (the model's tokenizer, the run's ``max_length`` as a cap), rounded up to a multiple of 8; the target is
  then that length (:func:`at_length`), so the latency table is profiled and cached at it (its fingerprint has the
  length), the search's budget applies at it and the export measures at it.
* :data:`REPORT_LENGTHS`: the lengths each exported point is also measured at (``measured.latency_by_length_ms``).
* :func:`export_reference`: the unpruned model, measured beside every exported point in rounds (drift correction);
  :class:`References`: in the point's own precision.

The search's latency constraint at a confidence (``--latency-confidence``) is
:meth:`toolchain.options.CompileOptions.constraints` over :meth:`latency_models.LatencyTable.latency_bound`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from targets import Target, TargetError
from toolchain.ship.verify import Reference

#: sequence lengths every exported point is also measured at, up to the model's positions
REPORT_LENGTHS = (16, 32, 64, 128, 256)
#: ``--sequence-length data``: the quantile of the training lengths, unless ``--sequence-length-quantile`` says
DEFAULT_LENGTH_QUANTILE = 0.95
_chosen: dict[str, tuple[int, str]] = {}  # one tokenization per data, model and quantile in a process


def parse_sequence_length(value) -> int | str | None:
    """``--sequence-length``: a positive number of tokens, ``"data"``, or ``None`` (the target's own)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "data":
        return "data"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise TargetError(f"--sequence-length must be a positive number of tokens or 'data', got {value!r}")


def data_sequence_length(data, model: str | None, quantile: float = DEFAULT_LENGTH_QUANTILE) -> tuple[int, str]:
    """The length ``data``'s training texts need: the ``quantile`` of their token counts (the model's tokenizer,
    truncated at ``data.max_length``), rounded up to a multiple of 8 and capped at ``data.max_length``; and why,
    in words ("p95 of 6000 sst2 training examples: 41 tokens -> 48")."""
    if not 0 < quantile <= 1:
        raise TargetError(f"--sequence-length-quantile must be in (0, 1], got {quantile}")
    key = json.dumps([data.to_dict(), model, quantile], sort_keys=True, default=str)
    if key not in _chosen:
        from transformers import AutoTokenizer

        from toolchain.core.modeling import resolve_model_path

        train = data.load("train")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        enc = tokenizer(*[list(c) for c in zip(*train.texts)], truncation=True, max_length=data.max_length)
        tokens = int(np.quantile([len(ids) for ids in enc["input_ids"]], quantile, method="higher"))
        n = min(8 * math.ceil(tokens / 8), int(data.max_length))
        task = data.train_file or train.spec.name
        cap = f" (capped at --max-length {data.max_length})" if n < 8 * math.ceil(tokens / 8) else ""
        _chosen[key] = n, (f"p{100 * quantile:g} of {len(train)} {task} training examples: {tokens} tokens -> {n}"
                           f"{cap}")
    return _chosen[key]


def sequence_length_for(value, data, model: str | None, quantile: float | None = None) -> tuple[int | None, str | None]:
    """``(length, why)`` for ``--sequence-length`` ``value`` (``None``: the target's own, ``(None, None)``)."""
    value = parse_sequence_length(value)
    if value is None:
        return None, None
    if value == "data":
        return data_sequence_length(data, model, DEFAULT_LENGTH_QUANTILE if quantile is None else quantile)
    return value, f"--sequence-length {value}"


def at_length(target: Target, length: int | None) -> Target:
    """``target`` at sequence length ``length`` (``None``: as it is)."""
    return target if length is None or length == target.sequence_length else replace(target, sequence_length=length)


def export_reference(table, target: Target) -> Reference:
    """How exported points are measured beside the unpruned model: its ONNX is set once it is exported (until then
    it is its own reference); drift-corrected figures are at the machine speed of the table's calibration (the
    unpruned network's latency then), where the table was measured here under the same conditions (fingerprint:
    device, runtime, threads, precision, batch, sequence length), else none."""
    speed = (table.calibration.get("latency") or {}).get("reference_ms")
    try:
        same = target.is_this_machine and not table.fingerprint_differences(target.fingerprint(table.precision))
    except TargetError:  # a table of a precision this target does not list
        same = False
    return Reference(None, float(speed) if speed and same else None)


class References:
    """The unpruned network each export is measured beside, in the export's own precision, its drift-corrected
    figure at the speed of that precision's table when it was calibrated (:func:`export_reference`): each table is
    calibrated beside the unpruned network in its own precision, and a busy machine does not slow every precision
    alike. In one default compile the fp32 reference read 8-16 % slow during the int8 exports while the int8 points
    read within 1-9 % of their predictions, so rescaling an int8 reading by the fp32 reference over-corrected it.

    ``precision``: the compile's, whose exports keep the reference they are given (the exported unpruned model);
    ``tables``: precision -> latency table; ``model``: the unpruned network, built once into a temporary folder per
    other precision (as its table's calibration built it, :func:`latency_models.grid.export_graph`) when an export
    of that precision first needs it. A context manager: the folder is removed on exit."""

    def __init__(self, precision: str, tables: dict, target: Target, model):
        self.precision, self.tables, self.target, self.model = precision, tables, target, model
        self._made: dict[str, Reference] = {}
        self._tmp: Path | None = None

    def __call__(self, precision: str | None, base: Reference) -> Reference:
        """The reference of an export in ``precision`` (``None``: the compile's); ``base``: the compile precision's."""
        p = precision or self.precision
        if p == self.precision or p not in self.tables:
            return base
        if p not in self._made:
            from latency_models.grid import export_graph

            self._tmp = self._tmp or Path(tempfile.mkdtemp(prefix="nasprune-reference-"))
            onnx = export_graph(self.model, self._tmp / f"unpruned-{p}.onnx", p, self.target)
            self._made[p] = replace(export_reference(self.tables[p], self.target), onnx=onnx,
                                    name=f"unpruned ({p})")
        return self._made[p]

    def __enter__(self) -> "References":
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def confidence_note(confidence: float | None, max_latency: float | None, table) -> str:
    """What ``--latency-confidence`` did to the search's latency limit, for the messages of an infeasible search."""
    if confidence is None or max_latency is None:
        return ""
    bound = table.latency_bound(confidence)
    return (f"\n(--latency-confidence {confidence:g}: a candidate's predicted latency x {bound['factor']:.3f}, the "
            f"bound from {bound['n']} validation residuals, must stay under {max_latency:g} ms: its prediction under "
            f"{max_latency / bound['factor']:.3g} ms)")
