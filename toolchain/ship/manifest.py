"""The run's ``manifest.json`` (settings, timings, hypervolume, one entry per exported point; docs/artifacts.md) and
reading a point's ``nasprune.json``."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Iterable

from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.export import ExportResult, metric_before_recovery, metric_dev
from toolchain.ship.jsonfile import versions, write_json_atomic
from toolchain.ship.selection import Selection

MANIFEST_FORMAT = "nasprune-manifest/1"


def load_export_info(folder: str | Path) -> dict:
    """``nasprune.json`` of an export folder."""
    return json.loads((Path(folder) / "nasprune.json").read_text())


def _point_entry(p: ExportResult | dict, run_dir: Path, feasible: bool | None = None) -> dict:
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
        "measured_latency_drift_corrected_ms": meas.get("latency_drift_corrected_ms"),
        "measured_latency_by_length_ms": meas.get("latency_by_length_ms"),
        "predicted_memory_mb": pred.get("memory_mb"),
        "measured_memory_mb": meas.get("memory_mb"),
        "metric": metric.get("score") if isinstance(metric, dict) else metric,
        "metric_name": metric.get("name") if isinstance(metric, dict) else None,
        # the metric above is on dev and unused training examples (toolchain.heldout); this one on dev alone
        "metric_dev": metric_dev(info),
        # the shared-weight score before recovery (toolchain.recover), on the same validation set
        "metric_before_recovery": metric_before_recovery(info),
        "feasible": bool(info.get("feasible", True) if feasible is None else feasible),
        "infeasible_reason": info.get("infeasible_reason"),
        # false: measured on this machine, not on the target's device; shipped by the latency table's predictions
        "measured_on_target": info.get("measured_on_target", True),
        # true: measured while the machine was disturbed (busy, or faster than usual), its budget judged by the
        # drift-corrected latency (selection.disturbed_reading)
        "judged_drift_corrected": bool(info.get("judged_drift_corrected", False)),
        # true: the export was copied from its recovered point's cache, its latency measured again (export_cache)
        "reused": bool(info.get("reused")),
        "attention_fused_ok": (info.get("onnx") or {}).get("attention_fused_ok"),
        # the search's point and its twins, how they scored in recovery, and which was exported (toolchain.twins)
        "uniform_twin": (info.get("extra") or {}).get("uniform_twin"),
    }


def write_manifest(run_dir: str | Path, settings: dict, timings: dict, hypervolume: float | dict | None,
                   points: Iterable[ExportResult | dict] | Selection) -> Path:
    """Write ``run_dir/manifest.json``: run settings, timings (s), hypervolume and one entry per point.

    ``points``: :class:`~toolchain.ship.export.ExportResult` objects, ``nasprune.json``-like dicts with a ``path``,
    or a :class:`~toolchain.ship.selection.Selection` (shipped points feasible, rejected ones listed with
    ``feasible: false``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(points, Selection):
        entries = [_point_entry(p, run_dir, True) for p in points.shipped]
        entries += [_point_entry(p, run_dir, False) for p, _ in points.rejected]
        failed = [{"subnetwork": c.subnet.to_dict(), "error": err} for c, err in points.failed]
        not_exported = [{"subnetwork": c.subnet.to_dict(), "precision": c.precision,
                         "predicted_latency_ms": c.predicted.get("latency_ms"), "why": why}
                        for c, why in points.not_exported]
    else:
        entries = [_point_entry(p, run_dir) for p in points]
        failed, not_exported = [], []
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
        "not_exported": not_exported,
        "versions": versions(),
    }
    return write_json_atomic(run_dir / "manifest.json", manifest)


def rewrite_points(run_dir: str | Path, shipped: list[ExportResult], rejected: list[tuple[ExportResult, str]],
                   unpruned: dict | None = None) -> Path:
    """``run_dir/manifest.json`` with its points made anew from ``shipped`` and ``rejected`` (after measurements on
    the device, :mod:`toolchain.ship.measured`); ``unpruned`` updates the reference's figures."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entries = [_point_entry(p, run_dir, True) for p in shipped] + [_point_entry(p, run_dir, False) for p, _ in rejected]
    manifest.update(points=entries, num_points=len(entries), num_feasible=len(shipped),
                    updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if unpruned:
        manifest["settings"]["unpruned"] = {**(manifest["settings"].get("unpruned") or {}), **unpruned}
    return write_json_atomic(run_dir / "manifest.json", manifest)


NOT_ON_TARGET = ("not measured on the target: the table is another device's, so 'meas ms' / 'mem MB' are this "
                 "machine's and the budget was checked on its predictions. Measure on the device: run_profile.py "
                 "--measure-points RUN --out measured.json, then nasprune export RUN --measured measured.json")


#: what each alternative to a search's point is called (``uniform_twin["chosen"]``; toolchain.twins)
TWINS = {"twin": "uniform twin", "fisher": "Fisher twin"}


def twin_comparison(note: dict, chosen: bool = False) -> str:
    """How a point and its twins compared (``extra.uniform_twin``): their scores after the screening share of the
    recovery, or after all of it; the chosen one's only with ``chosen``."""
    names = [n for n in ("point", *TWINS) if n in note and (chosen or n != note["chosen"])]
    if "screen_steps" in note:
        step, total = note["screen_steps"]
        return (", ".join(f"{n} {note[n + '_screen_score']:.4f}" for n in names)
                + f" after {step} of {total} recovery steps")
    return ", ".join(f"{n} {note[n + '_score_after_recovery']:.4f}" for n in names) + " after recovery"


def manifest_lines(manifest: dict) -> list[str]:
    """The table of points of a ``manifest.json`` as the CLI prints it: the unpruned reference first, then every
    exported point, and what the table's columns and markers mean."""
    unpruned = manifest["settings"].get("unpruned") or {}
    rows = [("unpruned", *(unpruned.get(k) for k in ("parameters", "predicted_latency_ms", "measured_latency_ms",
             "measured_memory_mb", "metric_before_recovery", "metric_dev", "metric", "path")))]
    rows += [(p["id"], p["parameters"], p["predicted_latency_ms"], p["measured_latency_ms"], p["measured_memory_mb"],
              p.get("metric_before_recovery"), p.get("metric_dev"), p["metric"],
              p["path"] + ("" if p["feasible"] else f"  (not shipped: {p.get('infeasible_reason') or 'over budget'})")
              + ("" if p.get("measured_on_target", True) else "  (not measured on the target)")
              + (f"  (machine disturbed: judged at {p['measured_latency_drift_corrected_ms']:.2f} ms drift-corrected)"
                 if p.get("judged_drift_corrected") else ""))
             for p in manifest["points"]]
    w = max(16, *(len(r[0]) for r in rows))  # ids of other precisions end in -int8 / -fp16
    header = (f"{'point':<{w}} {'params':>8} {'pred ms':>8} {'meas ms':>8} {'mem MB':>7} {'before':>7} "
              f"{'dev':>7} {'metric':>7}  path")
    lines = [header, "-" * len(header)]
    for pid, params, pred, meas, mem, before, dev, metric, path in rows:
        shown = f"{before:>7.4f}" if before is not None else f"{'':>7}"
        pred = f"{pred:>8.2f}" if pred is not None else f"{'-':>8}"  # another precision than the table's
        lines.append(f"{pid:<{w}} {(params or 0) / 1e6:>7.2f}M {pred} {meas or 0:>8.2f} {mem or 0:>7.1f} "
                     f"{shown} {dev if dev is not None else metric or 0:>7.4f} {metric or 0:>7.4f}  {path}")
    if any(r[5] is not None for r in rows):
        lines.append("before: shared-weight metric on dev before recovery; dev: the exported ONNX model's on dev, "
                     "after it")
    if any(r[6] is not None and r[6] != r[7] for r in rows):
        lines.append("metric: the exported ONNX model's on dev and unused training examples, what the shipped "
                     "points were chosen by (nasprune.json: metric.parts)")
    twins = {(t[t["chosen"]], t["point"]): t for p in manifest["points"]
             if (t := p.get("uniform_twin") or {}).get("chosen") in TWINS}
    for (twin, point), t in twins.items():
        lines.append(f"{twin}: the {TWINS[t['chosen']]} of the search's {point}, exported in its place ({t['metric']} "
                     f"{t[t['chosen'] + '_score_after_recovery']:.4f} after recovery; {twin_comparison(t)})")
    reused = sum(bool(p.get("reused")) for p in manifest["points"])
    if reused:
        lines.append(f"{reused} of {len(manifest['points'])} exports copied from the cache of their recovered points, "
                     "their latency measured again (nasprune.json: reused)")
    skipped = manifest.get("not_exported") or []
    if skipped:
        own = manifest["settings"].get("precision")
        lines.append("not exported, predicted over the budget beyond every error of their table: " + ", ".join(
            f"{SubNetwork.from_dict(c['subnetwork']).key()} in {c['precision'] or own} ({c['predicted_latency_ms']:.2f}"
            " ms)" for c in skipped))
    if not all(p.get("measured_on_target", True) for p in manifest["points"]):
        lines.append(NOT_ON_TARGET)
    return lines
