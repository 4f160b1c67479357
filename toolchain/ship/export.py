"""One export folder per sub-network: :func:`export_point` and what it returns, :class:`ExportResult`.

:func:`export_point` slices a sub-network out of the (super-)network, builds the optimized ONNX model (eager
attention, ORT fusion, int8 dynamic quantization if asked), verifies it against the sliced torch model, measures
latency and memory on the target and writes the folder described in docs/artifacts.md::

    <out_dir>/model.onnx  config.json  tokenizer files  nasprune.json

The folder is written under a temporary sibling name and renamed into place only when everything succeeded, so a
folder named like a point is always complete. Which points are shipped: :mod:`toolchain.ship.selection`; the run's
``manifest.json``: :mod:`toolchain.ship.manifest`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from toolchain.onnx.build import build_onnx, count_ops, input_names_for
from toolchain.core.modeling import max_sequence_length
from toolchain.core.slicing import slice_model
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.jsonfile import versions, write_json_atomic
from toolchain.ship.verify import (
    FP32_GPU_TOLERANCE,
    FP32_TOLERANCE,
    MetricData,
    Reference,
    as_metric_data,
    measure_exported,
    meter_settings,
    open_session,
    target_providers,
    target_threads,
    verify_onnx,
)

log = logging.getLogger(__name__)

FORMAT = "nasprune-export/1"
PRECISIONS = ("fp32", "fp16", "int8")
ATTENTION_OPS = ("Attention", "QAttention", "MultiHeadAttention")


@dataclass
class ExportResult:
    """What :func:`export_point` wrote; ``info`` is the content of ``nasprune.json``."""

    path: Path
    point_id: str
    subnet: SubNetwork
    info: dict

    @property
    def parameters(self) -> int:
        return int(self.info["parameters"])

    @property
    def measured_latency_ms(self) -> float | None:
        return (self.info.get("measured") or {}).get("latency_ms")

    @property
    def measured_latency_drift_corrected_ms(self) -> float | None:
        """The measured latency at the machine speed of the latency table's calibration (measured beside the
        unpruned reference; ``None`` otherwise)."""
        return (self.info.get("measured") or {}).get("latency_drift_corrected_ms")

    @property
    def measured_memory_mb(self) -> float | None:
        return (self.info.get("measured") or {}).get("memory_mb")

    @property
    def metric(self) -> dict | None:
        return self.info.get("metric")

    @property
    def attention_fused_ok(self) -> bool:
        return bool(self.info["onnx"]["attention_fused_ok"])

    @property
    def metric_before_recovery(self) -> float | None:
        return metric_before_recovery(self.info)

    @property
    def metric_dev(self) -> float | None:
        return metric_dev(self.info)


def metric_before_recovery(info: dict) -> float | None:
    """The shared-weight score before recovery (:mod:`toolchain.recover`) that ``nasprune.json`` records; None for a
    point that was not recovered."""
    return ((info.get("extra") or {}).get("recovery") or {}).get("score_before")


def metric_dev(info: dict) -> float | None:
    """The exported model's metric on dev alone: its part ``dev`` when it was scored on dev and unused training
    examples too (:mod:`toolchain.heldout`), else its metric."""
    metric = info.get("metric")
    if not isinstance(metric, dict):
        return metric
    return ((metric.get("parts") or {}).get("dev") or {}).get("score", metric.get("score"))


# --------------------------------------------------------------------------------------------------- helpers


def _unpack_model(model_or_supernet):
    """``(model, supernet_or_None)`` for a HF classifier or a :class:`~toolchain.core.supernet.SuperNetwork`."""
    if hasattr(model_or_supernet, "slice") and hasattr(model_or_supernet, "use"):
        return model_or_supernet.model, model_or_supernet
    return model_or_supernet, None


def _target_info(target, precision: str) -> dict | None:
    if target is None:
        return None
    fp = None
    if hasattr(target, "fingerprint"):
        try:
            fp = target.fingerprint(precision)
        except Exception as e:  # a fingerprint that cannot be taken is recorded, not fatal
            fp = {"error": f"{type(e).__name__}: {e}"}
    return {"name": getattr(target, "name", None), "fingerprint": fp,
            "intra_op_threads": target_threads(target)}


def _uses_gpu(target) -> bool:
    flag = getattr(target, "uses_gpu", None) if target is not None else None
    if isinstance(flag, bool):
        return flag
    for attr in ("provider", "execution_provider", "providers"):
        v = getattr(target, attr, None) if target is not None else None
        if v and any("CUDA" in str(p) or "Tensorrt" in str(p) or "ROCM" in str(p) for p in np.atleast_1d(v)):
            return True
    return False


@contextlib.contextmanager
def _quiet_optimizer():
    """ORT's attention fusion warns about every layer whose width differs from the hidden size (expected after
    pruning: the head count is read per layer) and the quantizer asks for pre-processing: keep those out of logs."""
    names = ("fusion_attention", "onnxruntime.transformers.fusion_attention", "root")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names[:2]]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    root_filter = _DropMessages(("Input hidden size", "pre-processing before quantization"))
    logging.getLogger().addFilter(root_filter)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        logging.getLogger().removeFilter(root_filter)


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover
            return True
        return not any(f in msg for f in self.fragments)


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------------------------- export


def export_point(
    model_or_supernet,
    subnet: SubNetwork,
    tokenizer,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    target=None,
    batch: int = 1,
    seq_len: int = 128,
    predicted: dict | None = None,
    metric_data: MetricData | Any | None = None,
    extra: dict | None = None,
    session_factory: Callable | None = None,
    point_id: str | None = None,
    measure: bool = True,
    memory: bool = True,
    warmup: int | None = None,
    reps: int | None = None,
    reference: Reference | None = None,
    lengths: Sequence[int] = (),
    overwrite: bool = False,
    eval_batch_size: int = 32,
    sliced_weights: torch.nn.Module | None = None,
    _fail_after: str | None = None,
) -> ExportResult:
    """Slice ``subnet``, build + verify + measure its ONNX model and write the export folder ``out_dir``.

    ``target`` (duck-typed: ``session(path)``, ``batch_size``, ``sequence_length``, ``precisions``,
    ``intra_op_threads``, ``name``, ``fingerprint(precision)``) sets the session, batch and sequence length; without
    one, ``session_factory(path)`` or a CPU session with one thread per physical core is used, at ``batch`` x
    ``seq_len``. ``predicted`` = ``{"latency_ms": .., "memory_mb": ..}`` from the latency model. ``metric_data``
    (a :class:`~toolchain.ship.verify.MetricData` or a ``TextDataset``) gives the validation metric of the ONNX model.
    fp32 outputs must match the sliced model to 1e-4, 1e-3 on a GPU target (else
    :class:`~toolchain.ship.verify.VerificationError` and no folder). ``sliced_weights``: the sliced network to
    export as it is (``subnet``'s slice with its own weights, e.g. a recovered point), then the only reference.

    Latency and memory are measured by :func:`~toolchain.ship.verify.measure_exported` (the latency tables' meter,
    in a fresh process, with the target's settings; ``session_factory`` is for verification only): ``warmup`` /
    ``reps`` fix the runs (default: the meter's, as profiling), ``reference`` (the unpruned model's ONNX) is measured
    beside the point in rounds for a drift-corrected figure, ``lengths`` adds latency at those sequence lengths (up
    to the model's positions). ``_fail_after`` (tests only) raises after the named stage to check that nothing
    half-written remains.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (one of {', '.join(PRECISIONS)})")
    if target is not None:
        allowed = getattr(target, "precisions", None)
        if allowed and precision not in allowed:
            raise ValueError(f"target '{getattr(target, 'name', target)}' does not support {precision} "
                             f"(supports {', '.join(allowed)})")
        batch = int(getattr(target, "batch_size", None) or batch)
        seq_len = int(getattr(target, "sequence_length", None) or seq_len)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    point_id = point_id or out_dir.name

    model, supernet = _unpack_model(model_or_supernet)
    if sliced_weights is not None:  # e.g. a recovered point: the sliced network with its own weights
        sliced, supernet = sliced_weights, None
    else:
        sliced = supernet.slice(subnet) if supernet is not None else slice_model(model, subnet)
    sliced = sliced.float().eval()
    metric_data = as_metric_data(metric_data, tokenizer, seq_len)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        onnx_path = tmp / "model.onnx"
        with _quiet_optimizer():
            fused = build_onnx(sliced, onnx_path, precision, batch, seq_len, use_gpu=_uses_gpu(target))
        graph_ops = count_ops(onnx_path)
        expected_att = sum(1 for i in subnet.kept_layers if subnet.heads[i] > 0)
        found_att = sum(graph_ops.get(op, 0) for op in ATTENTION_OPS)
        attention_ok = found_att == expected_att
        if not attention_ok:
            log.warning("point %s: %d fused attention nodes, expected %d (one per layer that keeps heads)",
                        point_id, found_att, expected_att)
        if _fail_after == "onnx":
            raise RuntimeError("simulated failure after the ONNX build")

        sliced.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        session = open_session(onnx_path, target, session_factory)
        masked = None
        if supernet is not None:
            def masked(**kw):
                with supernet.use(subnet) as m:
                    return m(**kw)
        tolerance = FP32_GPU_TOLERANCE if _uses_gpu(target) else FP32_TOLERANCE
        verification = verify_onnx(session, sliced, tokenizer, precision=precision, seq_len=seq_len,
                                   metric_data=metric_data, reference_model=masked, eval_batch_size=eval_batch_size,
                                   tolerance=tolerance)
        metric = verification.pop("metric", None)
        if _fail_after == "verify":
            raise RuntimeError("simulated failure after verification")

        measured: dict[str, Any] = {"latency_ms": None, "memory_mb": None}
        if measure or memory:
            runs = {k: v for k, v in (("warmup", warmup), ("min_reps", reps), ("max_reps", reps)) if v is not None}
            if reps is not None:
                runs["min_time_s"] = 0.0  # exactly ``reps`` runs
            top = max_sequence_length(sliced.config)
            measured = measure_exported(onnx_path, meter_settings(target, session, batch, seq_len),
                                        sliced.config.vocab_size, latency=measure, memory=memory,
                                        measurement=runs or None, reference=reference,
                                        lengths=[n for n in lengths if n <= top and n != seq_len])
        if measure:
            measured.update(intra_op_threads=target_threads(target), providers=target_providers(target, session))
        del session

        predicted = dict(predicted or {})
        info = {
            "format": FORMAT,
            "id": point_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_type": sliced.config.model_type,
            "subnetwork": subnet.to_dict(),
            "subnetwork_key": subnet.key(),
            "kept_layers": list(subnet.kept_layers),
            "parameters": count_parameters(sliced),
            "precision": precision,
            "target": _target_info(target, precision),
            "batch_size": batch,
            "sequence_length": seq_len,
            "inputs": input_names_for(sliced.config),
            "outputs": ["logits"],
            "num_labels": int(sliced.config.num_labels),
            "predicted": {"latency_ms": predicted.get("latency_ms"), "memory_mb": predicted.get("memory_mb"),
                          **{k: v for k, v in predicted.items() if k not in ("latency_ms", "memory_mb")}},
            "measured": measured,
            "metric": metric,
            "onnx": {"fused_ops": fused, "graph_ops": graph_ops, "attention_expected": expected_att,
                     "attention_found": found_att, "attention_fused_ok": attention_ok,
                     "file_bytes": onnx_path.stat().st_size},
            "verification": verification,
            "versions": versions(),
            "extra": extra or {},
        }
        write_json_atomic(tmp / "nasprune.json", info)
        if _fail_after == "json":
            raise RuntimeError("simulated failure before the final rename")

        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(path=out_dir, point_id=point_id, subnet=subnet, info=info)
