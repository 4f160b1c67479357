"""Multi-objective search for Pareto-optimal sub-networks (NSGA-II from pymoo; random and local search baselines).

The search only proposes sub-networks; what they score comes from one user-supplied callable
``evaluate(subnet) -> {"error": ..., "latency": ..., "memory": ..., "params": ...}`` (validation error with shared
weights, latency in ms and memory in MB from a lookup table, parameter count from the search space). Every distinct
candidate is evaluated once (cached by ``subnet.key()``), appended to ``search_history.csv`` as it happens, and a
search interrupted half-way resumes from that file: the same seeded algorithm re-runs, and candidates found in the
history are not evaluated again. Candidates are scored in batches fixed by the method (an NSGA-II generation, a
batch of random samples), which an executor (:mod:`toolchain.search.executors`: this process, or Ray workers) may run in
parallel; the results are recorded in the order of the batch, so every executor gives the same result. See
docs/search.md and docs/scaling.md.

Entry point: :func:`run_search` (here). The modules, one job each:

* :mod:`~toolchain.search.objectives`: metrics, objectives and constraints, their checks, feasibility; the errors;
* :mod:`~toolchain.search.history`: ``search_history.csv`` (:class:`SearchHistory`);
* :mod:`~toolchain.search.candidates`: :class:`CandidateStore`, each distinct candidate scored once (cache, budget,
  history, executor);
* :mod:`~toolchain.search.problem`: :class:`PruningProblem`, the pymoo ``Problem`` over a space's encoding;
* :mod:`~toolchain.search.methods`: NSGA-II, random and local search;
* :mod:`~toolchain.search.pareto`: non-dominated sets, best point under a budget, front + knee + hypervolume;
* :mod:`~toolchain.search.hypervolume`: the fixed normalisation and the knee;
* :mod:`~toolchain.search.result`: :class:`SearchResult` (``pareto.json``) and the message when nothing is feasible;
* :mod:`~toolchain.search.executors`: where evaluations run (this process, or Ray workers).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

from toolchain.core.search_space import SearchSpace
from toolchain.core.subnetwork import SubNetwork
from toolchain.search.candidates import CandidateStore
from toolchain.search.history import HISTORY_COLUMNS, HISTORY_FILE, SearchHistory
from toolchain.search.methods import (
    initial_population,
    ladder,
    local_search,
    mutate,
    nsga2_search,
    random_search,
    space_size,
)
from toolchain.search.objectives import (
    CONSTRAINT_METRICS,
    METHODS,
    METRICS,
    UNITS,
    BudgetExhausted,
    HistoryError,
    SearchError,
    check_constraints,
    check_objectives,
)
from toolchain.search.pareto import best_under, non_dominated, summarize
from toolchain.search.problem import PruningProblem
from toolchain.search.result import SearchResult, closest_points, infeasible_message

__all__ = [
    "BudgetExhausted", "CONSTRAINT_METRICS", "CandidateStore", "HISTORY_COLUMNS", "HISTORY_FILE", "HistoryError",
    "METHODS", "METRICS", "PruningProblem", "SearchError", "SearchHistory", "SearchResult", "UNITS", "best_under",
    "closest_points", "infeasible_message", "initial_population", "ladder", "mutate", "non_dominated", "run_search",
    "space_size", "summarize",
]

log = logging.getLogger(__name__)


def run_search(
    space: SearchSpace,
    evaluate: Callable[[SubNetwork], dict[str, float]],
    *,
    objectives=("error", "latency"),
    constraints: dict[str, float] | None = None,  # keys: "latency","memory","params"
    method="nsga2",
    n_evals=200,
    max_seconds=None,
    pop_size=20,
    seed=0,
    history_path: Path | None = None,
    normalizers: dict[str, float] | None = None,
    progress=True,
    executor=None,
    batch_size: int | None = None,
    on_evaluated: Callable[[dict], None] | None = None,
) -> SearchResult:
    """Search ``space`` for the Pareto set of ``objectives`` under ``constraints`` with ``method``.

    Budget: ``n_evals`` distinct candidates (including those reused from the history) and, optionally,
    ``max_seconds`` of wall time; whichever comes first. ``normalizers`` fix the hypervolume scale per objective
    (the unpruned network's latency / memory / params); missing ones are taken from evaluating ``space.largest()``
    first (which then counts as the first candidate). ``history_path`` is ``search_history.csv`` or its folder;
    an existing file is resumed from. Returns a :class:`SearchResult`.

    ``executor`` (:mod:`toolchain.search.executors`; default: local, in this process) runs the new candidates of each
    batch: on Ray, ``evaluate`` must be picklable and is shipped once to each worker. Batches are fixed by the method
    and ``batch_size``, never by the executor, so every executor visits the same candidates in the same order and
    returns the same Pareto set for the same seed (given a deterministic ``evaluate``). NSGA-II evaluates one
    generation (``pop_size`` candidates) per batch; random search draws ``batch_size`` (default 16) samples per
    batch, which does not change its candidates; local search mutates ``batch_size`` (default 1, the sequential
    algorithm) members of the front per round, which does. ``on_evaluated(record)`` is called here, in the driver,
    for each newly evaluated candidate (e.g. to keep a cache).
    """
    t0 = time.perf_counter()
    objectives = check_objectives(objectives)
    constraints = check_constraints(constraints)
    if method not in METHODS:
        raise SearchError(f"unknown search method '{method}'; choose one of: {', '.join(METHODS)}")
    if int(n_evals) < 1:
        raise SearchError(f"n_evals must be at least 1, got {n_evals}")
    if max_seconds is not None and not max_seconds > 0:
        raise SearchError(f"max_seconds must be positive, got {max_seconds}")
    if method == "nsga2" and int(pop_size) < 2:
        raise SearchError(f"pop_size must be at least 2, got {pop_size}")
    if batch_size is not None and int(batch_size) < 1:
        raise SearchError(f"batch_size must be at least 1, got {batch_size}")
    normalizers = {k: float(v) for k, v in (normalizers or {}).items() if v is not None}
    for k, v in normalizers.items():
        if k not in METRICS or not math.isfinite(v) or v <= 0:
            raise SearchError(f"bad normalizer {k}={v}: expected a positive value for one of {', '.join(METRICS)}")

    history = SearchHistory(history_path, space) if history_path is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(n_evals), desc=f"search ({method})", unit="eval", leave=False)
    store = CandidateStore(evaluate, objectives=objectives, constraints=constraints, history=history,
                           n_evals=int(n_evals), max_seconds=max_seconds, progress=bar, executor=executor,
                           on_evaluated=on_evaluated)
    store.start = t0
    try:
        need = [o for o in objectives if o != "error" and o not in normalizers]
        stop = ""
        if need:
            try:
                largest = store(space.largest())
            except BudgetExhausted as e:
                stop = f"budget ({e})"
            else:
                for o in need:
                    if largest[o] <= 0:
                        raise SearchError(f"the unpruned network's {o} is {largest[o]}; cannot normalise by it")
                    normalizers[o] = largest[o]
        if not stop:
            if method == "nsga2":
                stop = nsga2_search(space, store, int(seed), int(pop_size))
            elif method == "random":
                stop = random_search(space, store, int(seed), int(batch_size or 16))
            else:
                stop = local_search(space, store, int(seed), int(batch_size or 1))
    finally:
        store.close()
        if bar is not None:
            bar.close()
        if history is not None:
            history.close()
    for o in objectives:
        if o not in normalizers and o != "error":  # only when the budget ran out before anything was evaluated
            normalizers[o] = float("nan")
    records = store.visited
    if all(math.isfinite(normalizers.get(o, 1.0)) for o in objectives):
        pareto, knee, hv = summarize(records, objectives, normalizers)
    else:
        pareto, knee, hv = [], None, 0.0
    wall = time.perf_counter() - t0
    result = SearchResult(
        method=method, seed=int(seed), objectives=objectives, constraints=constraints, normalizers=normalizers,
        records=records, pareto=pareto, knee=knee, hypervolume=hv, wall_time=wall, n_new=store.n_new,
        n_from_history=len(records) - store.n_new, eval_seconds=store.eval_seconds, stop_reason=stop,
        history_path=history.path if history is not None else None, wait_seconds=store.wait_seconds,
        executor=store.executor.name, workers=store.executor.workers,
    )
    log.info("search %s: %d candidates (%d new), %d feasible, %d on the Pareto front, HV %.4f, %.1fs (%s)",
             method, len(records), result.n_new, len(result.feasible), len(pareto), hv, wall, stop)
    return result
