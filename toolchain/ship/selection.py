"""Which points are shipped: candidates in shipping order (:func:`export_order`), exported one after the other
until ``n_points`` of them meet the constraints when *measured* (:func:`select_and_export`).

Violators are reported and kept apart (``rejected/``); a candidate whose export fails is reported and skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.export import ExportResult, export_point
from toolchain.ship.jsonfile import write_json_atomic

log = logging.getLogger(__name__)


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


def export_order(front: list[dict], n: int) -> list[dict]:
    """Search records in shipping order: the best metric (lowest ``error``) first, then points spread along the
    front (cheaper ones, by ``latency``), then the rest as fall-backs."""
    if not front:
        return []
    by_metric = sorted(front, key=lambda r: r["error"])
    order = [by_metric[0]]
    rest = sorted((r for r in front if r is not by_metric[0]), key=lambda r: r.get("latency", 0), reverse=True)
    if rest and n > 1:  # evenly spaced over the remaining front, then everything else as fall-backs
        step = max(1, len(rest) // (n - 1))
        spread = rest[step - 1::step][: n - 1] or rest[: n - 1]
        order += spread + [r for r in rest if r not in spread]
    return order + [r for r in by_metric[1:] if r not in order]


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
    candidates: Iterable[Candidate],
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
    ``export_fn`` (default :func:`~toolchain.ship.export.export_point`).
    """
    run_dir = Path(run_dir)
    points_dir, rejected_dir = run_dir / "points", run_dir / "rejected"
    shipped: list[ExportResult] = []
    rejected: list[tuple[ExportResult, str]] = []
    failed: list[tuple[Candidate, str]] = []
    for rank, cand in enumerate(candidates):
        if len(shipped) >= n_points:
            break
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
