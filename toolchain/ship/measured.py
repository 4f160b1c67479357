"""Figures measured on the device, read back: ``python run_profile.py --measure-points RUN --out measured.json`` in
a profiling bundle measures a run's exported points there (:func:`latency_models.bundle_runner.measure_points`);
:func:`apply_measured` gives each point its device figures, gates it on them
(:func:`~toolchain.ship.selection.constraint_violation`) and moves it between ``points/`` and ``rejected/``. The
figures this machine measured stay in ``nasprune.json`` as ``measured_here``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from targets.meter import MEASURED_FORMAT, point_key
from toolchain.core.atomic import write_json_atomic
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.export import ExportResult
from toolchain.ship.manifest import rewrite_points
from toolchain.ship.selection import Selection, constraint_violation

log = logging.getLogger(__name__)


class MeasuredError(ValueError):
    """A measurements file that cannot be used; the message names it and what to do."""


def load_measured(path: str | Path) -> dict:
    """The ``points`` (point key -> figures) of a file written by ``run_profile.py --measure-points``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeasuredError(f"measurements not found: {path}") from None
    except ValueError as e:
        raise MeasuredError(f"{path} is not valid JSON ({e}); measure the points again") from None
    if not isinstance(data, dict) or data.get("format") != MEASURED_FORMAT or not isinstance(data.get("points"), dict):
        raise MeasuredError(f"{path} is not a file of measured points (format {MEASURED_FORMAT}); write one with "
                            "python run_profile.py --measure-points RUN --out measured.json in a profiling bundle")
    return data["points"]


def apply_measured(run_dir: str | Path, points: dict, max_latency_ms: float | None,
                   max_memory_mb: float | None) -> tuple[Selection, int]:
    """Give every exported point of ``run_dir`` that ``points`` measured its device figures and gate it on them;
    rewrite its ``nasprune.json`` and the run's ``manifest.json``. Returns the selection and how many points were
    measured on the device (the others keep what they had)."""
    run_dir = Path(run_dir)
    shipped, rejected, n_measured = [], [], 0
    for folder in sorted(p.parent for sub in ("points", "rejected") for p in (run_dir / sub).glob("*/nasprune.json")):
        info = json.loads((folder / "nasprune.json").read_text())
        res = ExportResult(folder, info["id"], SubNetwork.from_dict(info["subnetwork"]), info)
        device = points.get(point_key(info))
        if device is not None:
            n_measured += 1
            info.setdefault("measured_here", info.get("measured"))
            info["measured"] = {k: device.get(k) for k in ("latency_ms", "memory_mb", "latency", "memory")}
            why = constraint_violation(res, max_latency_ms, max_memory_mb)
            info.update(feasible=why is None, infeasible_reason=why)
            res.path = _move(folder, run_dir / ("points" if why is None else "rejected"))
            write_json_atomic(res.path / "nasprune.json", info)
        (shipped if info.get("feasible", True) else rejected).append(res)
    unpruned = run_dir / "reference" / "unpruned" / "nasprune.json"
    reference = None
    if unpruned.is_file():
        device = points.get(point_key(json.loads(unpruned.read_text())))
        reference = device and {"measured_latency_ms": device["latency_ms"],
                                "measured_memory_mb": device["memory_mb"], "measured_on_target": True}
    rewrite_points(run_dir, shipped, [(r, r.info.get("infeasible_reason")) for r in rejected], reference)
    return Selection(shipped, [(r, r.info.get("infeasible_reason")) for r in rejected], [], False), n_measured


def gate_on_device(run_dir: str | Path, measured: str | Path, max_latency_ms: float | None,
                   max_memory_mb: float | None) -> Selection:
    """``nasprune export RUN --measured FILE``: :func:`apply_measured` under the given budget, else the run's."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise MeasuredError(f"{run_dir} holds no exported points (no manifest.json): run `nasprune export "
                            f"{run_dir}` first")
    settings = json.loads((run_dir / "manifest.json").read_text())["settings"]
    max_latency_ms = settings.get("max_latency_ms") if max_latency_ms is None else max_latency_ms
    max_memory_mb = settings.get("max_memory_mb") if max_memory_mb is None else max_memory_mb
    selection, n = apply_measured(run_dir, load_measured(measured), max_latency_ms, max_memory_mb)
    if not n:
        raise MeasuredError(f"{measured} measured none of the points of {run_dir} (other sub-networks, precision, "
                            "batch or sequence length): measure this run's points with the bundle")
    log.info("%d point(s) gated on their figures measured on the device (%s)", n, measured)
    return selection


def _move(folder: Path, parent: Path) -> Path:
    if folder.parent == parent:
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, parent / folder.name)
    return parent / folder.name
