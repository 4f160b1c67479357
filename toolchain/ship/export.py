"""One export folder per Pareto point, the run manifest, and "ship only what is measured feasible".

:func:`export_point` slices a sub-network out of the (super-)network, builds the optimized ONNX model (eager
attention, ORT fusion, int8 dynamic quantization if asked), verifies it against the sliced torch model, measures
latency and memory on the target and writes the folder described in docs/artifacts.md::

    <out_dir>/model.onnx  config.json  tokenizer files  nasprune.json

The folder is written under a temporary sibling name and renamed into place only when everything succeeded, so a
folder named like a point is always complete.

:func:`select_and_export` walks candidates in order and ships the first ``n_points`` whose *measured* latency (and
memory) meets the constraints; violators are reported and kept apart. :func:`write_manifest` writes the run's
``manifest.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from toolchain.onnx.build import build_onnx, count_ops, input_names_for
from toolchain.core.slicing import slice_model
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.verify import (
    FP32_GPU_TOLERANCE,
    FP32_TOLERANCE,
    MetricData,
    as_metric_data,
    latency_inputs,
    measure_latency,
    measure_memory,
    open_session,
    target_providers,
    target_threads,
    verify_onnx,
)

log = logging.getLogger(__name__)

FORMAT = "nasprune-export/1"
MANIFEST_FORMAT = "nasprune-manifest/1"
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
    def measured_memory_mb(self) -> float | None:
        return (self.info.get("measured") or {}).get("memory_mb")

    @property
    def metric(self) -> dict | None:
        return self.info.get("metric")

    @property
    def attention_fused_ok(self) -> bool:
        return bool(self.info["onnx"]["attention_fused_ok"])


# --------------------------------------------------------------------------------------------------- helpers


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    out = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["nasprune"] = version("nasprune")
    except Exception:  # pragma: no cover
        out["nasprune"] = None
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, SubNetwork):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, data) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


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
    warmup: int = 10,
    reps: int = 50,
    overwrite: bool = False,
    eval_batch_size: int = 32,
    _fail_after: str | None = None,
) -> ExportResult:
    """Slice ``subnet``, build + verify + measure its ONNX model and write the export folder ``out_dir``.

    ``target`` (duck-typed: ``session(path)``, ``batch_size``, ``sequence_length``, ``precisions``,
    ``intra_op_threads``, ``name``, ``fingerprint(precision)``) sets the session, batch and sequence length; without
    one, ``session_factory(path)`` or a CPU session with one thread per physical core is used, at ``batch`` x
    ``seq_len``. ``predicted`` = ``{"latency_ms": .., "memory_mb": ..}`` from the latency model. ``metric_data``
    (a :class:`~toolchain.ship.verify.MetricData` or a ``TextDataset``) gives the validation metric of the ONNX model.
    fp32 outputs must match the sliced model to 1e-4, 1e-3 on a GPU target (else
    :class:`~toolchain.ship.verify.VerificationError` and no folder). ``_fail_after`` (tests only) raises after the named stage to check that nothing half-written remains.
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
        reference = None
        if supernet is not None:
            def reference(**kw):
                with supernet.use(subnet) as m:
                    return m(**kw)
        tolerance = FP32_GPU_TOLERANCE if _uses_gpu(target) else FP32_TOLERANCE
        verification = verify_onnx(session, sliced, tokenizer, precision=precision, seq_len=seq_len,
                                   metric_data=metric_data, reference_model=reference, eval_batch_size=eval_batch_size,
                                   tolerance=tolerance)
        metric = verification.pop("metric", None)
        if _fail_after == "verify":
            raise RuntimeError("simulated failure after verification")

        measured: dict[str, Any] = {"latency_ms": None, "memory_mb": None}
        if measure:
            lat = measure_latency(session, latency_inputs(sliced.config, batch, seq_len), warmup=warmup, reps=reps)
            measured.update(latency_ms=lat["median_ms"], latency=lat,
                            intra_op_threads=target_threads(target), providers=target_providers(target, session))
        if memory:
            mem = measure_memory(onnx_path, batch=batch, seq_len=seq_len, threads=target_threads(target),
                                 providers=[p for p in target_providers(target, session)],
                                 vocab_size=sliced.config.vocab_size)
            measured.update(memory_mb=mem.pop("memory_mb"), memory=mem)
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
            "versions": _versions(),
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


def load_export_info(folder: str | Path) -> dict:
    """``nasprune.json`` of an export folder."""
    return json.loads((Path(folder) / "nasprune.json").read_text())


# ---------------------------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    """A sub-network proposed for export, in preference order, with the latency model's predictions."""

    subnet: SubNetwork
    predicted: dict = field(default_factory=dict)  # latency_ms, memory_mb, error, ...
    extra: dict = field(default_factory=dict)


@dataclass
class Selection:
    shipped: list[ExportResult]
    rejected: list[tuple[ExportResult, str]]  # (export, why)
    failed: list[tuple[Candidate, str]]  # (candidate, error) -- export or verification failed
    exhausted: bool  # candidates ran out before n_points were shipped

    def report(self) -> str:
        lines = [f"shipped {len(self.shipped)} point(s)"]
        for r, why in self.rejected:
            lines.append(f"  not shipped: {r.point_id}: {why}")
        for c, err in self.failed:
            lines.append(f"  export failed: {c.subnet}: {err}")
        if self.exhausted:
            lines.append("  candidates ran out before the requested number of feasible points was reached")
        return "\n".join(lines)


def as_candidate(c) -> Candidate:
    if isinstance(c, Candidate):
        return c
    if isinstance(c, SubNetwork):
        return Candidate(c)
    if isinstance(c, dict):
        sub = c.get("subnet", c.get("subnetwork"))
        sub = sub if isinstance(sub, SubNetwork) else SubNetwork.from_dict(sub)
        pred = dict(c.get("predicted") or {})
        for k in ("latency_ms", "memory_mb"):
            if k in c and k not in pred:
                pred[k] = c[k]
        return Candidate(sub, pred, dict(c.get("extra") or {}))
    if isinstance(c, (tuple, list)) and len(c) == 2:
        return Candidate(c[0], dict(c[1] or {}))
    raise TypeError(f"cannot read a candidate from {type(c).__name__}")


def constraint_violation(result: ExportResult, max_latency_ms: float | None, max_memory_mb: float | None) -> str | None:
    """Why a measured point breaks the constraints (``None`` if it meets them)."""
    why = []
    lat, mem = result.measured_latency_ms, result.measured_memory_mb
    if max_latency_ms is not None and lat is not None and lat > max_latency_ms:
        pred = (result.info.get("predicted") or {}).get("latency_ms")
        why.append(f"measured latency {lat:.2f} ms > max {max_latency_ms:g} ms"
                   + (f" (predicted {pred:.2f} ms)" if pred is not None else ""))
    if max_memory_mb is not None and mem is not None and mem > max_memory_mb:
        why.append(f"measured memory {mem:.1f} MB > max {max_memory_mb:g} MB")
    return "; ".join(why) or None


def select_and_export(
    candidates: Iterable,
    n_points: int,
    max_latency_ms: float | None,
    *,
    model_or_supernet,
    tokenizer,
    run_dir: str | Path,
    max_memory_mb: float | None = None,
    keep_rejected: bool = True,
    export_fn: Callable[..., ExportResult] = export_point,
    **export_kwargs,
) -> Selection:
    """Export ``candidates`` (ordered, best first) until ``n_points`` measured-feasible points are shipped.

    Shipped points go to ``run_dir/points/<id>``. A point whose MEASURED latency exceeds ``max_latency_ms`` (or
    measured memory ``max_memory_mb``) is not shipped as feasible: it is logged, moved to ``run_dir/rejected/<id>``
    (``keep_rejected``; else deleted), ``nasprune.json["feasible"]`` says false, and the next candidate is tried.
    A candidate whose export fails (e.g. verification) is reported and skipped. ``export_kwargs`` go to
    ``export_fn`` (default :func:`export_point`).
    """
    run_dir = Path(run_dir)
    points_dir, rejected_dir = run_dir / "points", run_dir / "rejected"
    shipped: list[ExportResult] = []
    rejected: list[tuple[ExportResult, str]] = []
    failed: list[tuple[Candidate, str]] = []
    rank = 0
    for rank, raw in enumerate(candidates):
        if len(shipped) >= n_points:
            break
        cand = as_candidate(raw)
        pid = f"{rank:02d}-{cand.subnet.key()}"
        try:
            res = export_fn(model_or_supernet, cand.subnet, tokenizer, points_dir / pid,
                            predicted=cand.predicted, extra=cand.extra or None, point_id=pid, overwrite=True,
                            **export_kwargs)
        except Exception as e:  # noqa: BLE001 - report, try the next one
            log.error("candidate %s (%s) could not be exported: %s", pid, cand.subnet, e)
            failed.append((cand, f"{type(e).__name__}: {e}"))
            continue
        why = constraint_violation(res, max_latency_ms, max_memory_mb)
        res.info["feasible"] = why is None
        res.info["infeasible_reason"] = why
        if why is None:
            write_json_atomic(res.path / "nasprune.json", res.info)
            shipped.append(res)
            log.info("shipped %s: %s", pid, _summary(res))
            continue
        log.warning("not shipping %s: %s; selecting the next candidate", pid, why)
        if keep_rejected:
            rejected_dir.mkdir(parents=True, exist_ok=True)
            dest = rejected_dir / pid
            if dest.exists():
                shutil.rmtree(dest)
            write_json_atomic(res.path / "nasprune.json", res.info)
            os.replace(res.path, dest)
            res.path = dest
        else:
            shutil.rmtree(res.path, ignore_errors=True)
        rejected.append((res, why))
    exhausted = len(shipped) < n_points
    if exhausted:
        log.warning("only %d of %d requested points meet the constraints when measured", len(shipped), n_points)
    return Selection(shipped, rejected, failed, exhausted)


def _summary(res: ExportResult) -> str:
    lat = res.measured_latency_ms
    return f"{res.parameters / 1e6:.2f}M params, " + (f"{lat:.2f} ms measured" if lat is not None else "no latency")


# ----------------------------------------------------------------------------------------------- manifest


def _point_entry(p, run_dir: Path, feasible: bool | None = None) -> dict:
    if isinstance(p, ExportResult):
        info, path = p.info, p.path
    else:  # a dict: nasprune.json content with "path"
        info, path = p, Path(p["path"])
    try:
        rel = str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        rel = str(path)
    meas, pred = info.get("measured") or {}, info.get("predicted") or {}
    metric = info.get("metric")
    return {
        "id": info.get("id"),
        "path": rel,
        "subnetwork": info.get("subnetwork"),
        "parameters": info.get("parameters"),
        "precision": info.get("precision"),
        "predicted_latency_ms": pred.get("latency_ms"),
        "measured_latency_ms": meas.get("latency_ms"),
        "predicted_memory_mb": pred.get("memory_mb"),
        "measured_memory_mb": meas.get("memory_mb"),
        "metric": metric.get("score") if isinstance(metric, dict) else metric,
        "metric_name": metric.get("name") if isinstance(metric, dict) else None,
        "feasible": bool(info.get("feasible", True) if feasible is None else feasible),
        "infeasible_reason": info.get("infeasible_reason"),
        "attention_fused_ok": (info.get("onnx") or {}).get("attention_fused_ok"),
    }


def write_manifest(run_dir: str | Path, settings: dict, timings: dict, hypervolume: float | dict | None,
                   points: Iterable | Selection) -> Path:
    """Write ``run_dir/manifest.json``: run settings, timings (s), hypervolume and one entry per point.

    ``points``: :class:`ExportResult` objects, ``nasprune.json``-like dicts with a ``path``, or a :class:`Selection`
    (shipped points feasible, rejected ones listed with ``feasible: false``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(points, Selection):
        entries = [_point_entry(p, run_dir, True) for p in points.shipped]
        entries += [_point_entry(p, run_dir, False) for p, _ in points.rejected]
        failed = [{"subnetwork": c.subnet.to_dict(), "error": err} for c, err in points.failed]
    else:
        entries = [_point_entry(p, run_dir) for p in points]
        failed = []
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "timings": timings,
        "hypervolume": hypervolume,
        "num_points": len(entries),
        "num_feasible": sum(e["feasible"] for e in entries),
        "points": entries,
        "failed": failed,
        "versions": _versions(),
    }
    return write_json_atomic(run_dir / "manifest.json", manifest)
