"""What a search found: :class:`SearchResult` (records, Pareto set, knee, hypervolume, timings; ``pareto.json``),
and what to tell the user when no candidate meets the constraints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from toolchain.core.atomic import write_json_atomic
from toolchain.search.hypervolume import REFERENCE_POINT
from toolchain.search.objectives import METRICS, UNITS


def _record_json(r: Mapping) -> dict:
    out = {"index": r["index"], "key": r["key"], "subnet": r["subnet"].to_dict()}
    out.update({m: r[m] for m in METRICS if m in r})
    out.update(feasible=bool(r["feasible"]), violation=r["violation"])
    if r.get("extra"):
        out["extra"] = r["extra"]
    return out


@dataclass
class SearchResult:
    """Everything a search found. Records are dicts: ``index``, ``key``, ``subnet`` (SubNetwork), the metric
    values, ``feasible``, ``violation`` (sum of relative constraint excess), ``extra``, ``eval_seconds``, ``time``."""

    method: str
    seed: int
    objectives: tuple[str, ...]
    constraints: dict[str, float]
    normalizers: dict[str, float]
    records: list[dict]
    pareto: list[dict]
    knee: dict | None
    hypervolume: float
    wall_time: float
    n_new: int  # evaluate() calls in this run
    n_from_history: int  # candidates reused from search_history.csv
    eval_seconds: float  # time spent inside evaluate()
    stop_reason: str
    history_path: Path | None = None
    reference_point: float = REFERENCE_POINT
    extra: dict = field(default_factory=dict)
    wait_seconds: float | None = None  # wall time spent waiting for evaluations (< eval_seconds with parallel workers)
    executor: str = "local"
    workers: int = 1

    @property
    def feasible(self) -> list[dict]:
        return [r for r in self.records if r["feasible"]]

    @property
    def evals_per_second(self) -> float:
        return self.n_new / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def overhead_seconds(self) -> float:
        """Wall time not spent waiting for ``evaluate`` (the search machinery, history writing, ...)."""
        waited = self.eval_seconds if self.wait_seconds is None else self.wait_seconds
        return max(self.wall_time - waited, 0.0)

    def closest(self, n: int = 3) -> list[dict]:
        return closest_points(self, n)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "seed": self.seed,
            "objectives": list(self.objectives),
            "constraints": dict(self.constraints),
            "normalizers": dict(self.normalizers),
            "reference_point": [self.reference_point] * len(self.objectives),
            "hypervolume": self.hypervolume,
            "n_evaluated": len(self.records),
            "n_new": self.n_new,
            "n_from_history": self.n_from_history,
            "n_feasible": len(self.feasible),
            "wall_time_s": self.wall_time,
            "eval_time_s": self.eval_seconds,
            "evals_per_second": self.evals_per_second,
            "executor": self.executor,
            "workers": self.workers,
            "stop_reason": self.stop_reason,
            "history": str(self.history_path) if self.history_path is not None else None,
            "knee": _record_json(self.knee) if self.knee is not None else None,
            "pareto": [_record_json(r) for r in self.pareto],
            "closest": [] if self.pareto else [_record_json(r) for r in self.closest()],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Path | str) -> Path:
        """Write :meth:`to_dict` to ``path`` (a file, or a folder -> ``<folder>/pareto.json``), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "pareto.json"
        return write_json_atomic(path, self.to_dict())


def closest_points(result: SearchResult, n: int = 3) -> list[dict]:
    """The ``n`` evaluated candidates with the smallest constraint violation (ties: better first objective).
    Meant for when ``result.feasible`` is empty."""
    first = result.objectives[0]
    return sorted(result.records, key=lambda r: (r["violation"], r[first], r["index"]))[:n]


def _fmt_value(name: str, value: float) -> str:
    if name == "params":
        return f"{value / 1e6:.2f}M params" if value >= 1e5 else f"{value:.0f} params"
    if name == "error":
        return f"error {value:.4f}"
    return f"{value:.3g}{UNITS[name]} {name}"


def infeasible_message(result: SearchResult, n: int = 3) -> str:
    """``no sub-network meets --max-latency 5ms; closest: ...`` (empty string if some candidate is feasible)."""
    if result.feasible:
        return ""
    limits = " ".join(f"--max-{c} {_fmt_value(c, v).split(' ')[0]}" for c, v in result.constraints.items())
    lines = [f"no sub-network meets {limits} (among {len(result.records)} evaluated); closest:"]
    for r in closest_points(result, n):
        shown = dict.fromkeys(tuple(result.constraints) + tuple(result.objectives))
        lines.append("  " + ", ".join(_fmt_value(m, r[m]) for m in shown if m in r) + f"  {r['subnet']}")
    return "\n".join(lines)
