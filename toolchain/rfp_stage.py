"""Stage 3 with ``--method rfp``: retraining-free pruning (Kwon et al. 2022, :mod:`toolchain.rfp`) of the
fine-tuned model, one mask per latency budget, in place of a search.

Each point's sub-network and scales are kept in ``<run>/rfp.json`` (budget -> point), written as they are found, so
an interrupted stage resumes; validation and export fold a point's scales into a copy of the weights
(:func:`point_supernet`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from toolchain.core.atomic import write_json_atomic
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork
from toolchain.evaluation import Evaluator
from toolchain.options import CompileError, CompileOptions
from toolchain.rfp import Scales, fold_scales, prune
from toolchain.run import Run
from toolchain.search import (HISTORY_FILE, METRICS, CandidateStore, SearchError, SearchHistory, SearchResult,
                              summarize)

RFP_FILE = "rfp.json"
RFP_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25)


def rfp_budgets(table, dims, max_latency: float | None) -> list[float]:
    """Latency budgets (ms) for the retraining-free method: ``RFP_FRACTIONS`` of the unpruned network's predicted
    latency (a front), plus ``max_latency``; budgets below the empty network's latency are left out."""
    n = dims.num_layers
    full = table.predict_latency(SubNetwork.full(n, dims.num_heads, dims.intermediate_size))
    floor = table.predict_latency(SubNetwork((0,) * n, (0,) * n))
    budgets = {round(f * full, 4) for f in RFP_FRACTIONS}
    if max_latency is not None:
        budgets.add(float(max_latency))
    return sorted((b for b in budgets if b >= floor), reverse=True)


def rfp_stage(run: Run, table, costs: Callable[[SubNetwork], dict], opts: CompileOptions,
              folder: Path) -> SearchResult:
    """Retraining-free pruning (``--method rfp``) of the fine-tuned model, one mask per latency budget; each point is
    scored on the same validation subsample as a search (``costs(subnet)``: its latency, memory and parameters) and
    recorded in ``search_history.csv``; the scales of each point go to ``rfp.json`` (export folds them into the
    weights)."""
    t0 = time.perf_counter()
    space = run.space
    n = opts.budget("search_eval_samples")
    enc = run.encoded("validation", max_samples=n, seed=opts.seed)
    path = folder / RFP_FILE
    saved = _load_rfp(path)
    constraints = opts.constraints(table)  # with a latency confidence: the limit on the predicted latency
    budgets = rfp_budgets(table, run.supernet.dims, constraints.get("latency"))
    if not budgets:
        raise SearchError("no latency budget is reachable: even the network without encoder layers is predicted "
                          f"at {table.predict_latency(space.smallest()):.2f} ms")
    todo = [b for b in budgets if str(b) not in saved]
    if todo:
        train = run.encoded("train", max_samples=opts.budget("rfp_samples"), seed=opts.seed)
        for r in prune(run.supernet.model, train, run.spec, todo, table, n_samples=opts.budget("rfp_samples"),
                       seed=opts.seed, progress=opts.progress):
            saved[str(r.budget)] = r.to_dict()
            write_json_atomic(path, saved, indent=None)

    by_key = _rfp_by_key(saved, path)

    def evaluate(subnet):
        entry = by_key[subnet.key()]
        ev = Evaluator(point_supernet(run, subnet, entry.get("scales")), enc, run.spec,
                       param_count=space.num_parameters)
        return {"error": ev(subnet)["error"], **costs(subnet), "budget_ms": float(entry["budget"])}

    normalizers = {k: v for k, v in costs(space.largest()).items() if k in METRICS}
    with SearchHistory(folder / HISTORY_FILE) as history:  # no space: a point's kept heads need not be the first
        store = CandidateStore(evaluate, objectives=opts.objectives, constraints=constraints, history=history)
        try:
            for b in budgets:
                store(SubNetwork.from_dict(saved[str(b)]["subnetwork"]))
        finally:
            store.close()
    records = store.visited
    pareto, knee, hv = summarize(records, opts.objectives, normalizers)
    result = SearchResult(method="rfp", seed=opts.seed, objectives=tuple(opts.objectives), constraints=constraints,
                          normalizers=normalizers, records=records, pareto=pareto, knee=knee, hypervolume=hv,
                          wall_time=time.perf_counter() - t0, n_new=store.n_new,
                          n_from_history=len(records) - store.n_new, eval_seconds=store.eval_seconds,
                          stop_reason=f"{len(budgets)} latency budgets", history_path=history.path)
    result.save(folder / "pareto.json")
    return result


def _damaged(path: Path, e: Exception) -> CompileError:
    return CompileError(f"{path} is damaged ({e}); delete it to recompute the rfp points")


def _load_rfp(path: Path) -> dict[str, dict]:
    """``rfp.json``: budget -> point (sub-network, scales, ...); empty when there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise _damaged(path, e) from e


def _rfp_by_key(saved: dict[str, dict], path: Path) -> dict[str, dict]:
    """The points of an ``rfp.json`` by sub-network key."""
    try:
        return {SubNetwork.from_dict(v["subnetwork"]).key(): v for v in saved.values()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(path, e) from e


def rfp_scales(folder: Path) -> dict[str, dict]:
    """Sub-network key -> rfp scales, from ``<folder>/rfp.json`` (empty for a run that did not use ``--method rfp``)."""
    path = Path(folder) / RFP_FILE
    try:
        return {key: v["scales"] for key, v in _rfp_by_key(_load_rfp(path), path).items()}
    except KeyError as e:
        raise _damaged(path, e) from e


def point_supernet(run: Run, subnet: SubNetwork, scales: dict | None) -> SuperNetwork:
    """The network a point runs on: the shared weights, or (rfp) a copy with the point's scales folded in."""
    if not scales:
        return run.supernet
    return SuperNetwork(fold_scales(run.supernet.model, subnet, Scales.from_dict(scales)))
