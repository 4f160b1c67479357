"""Each distinct candidate of a search scored once: :class:`CandidateStore` (cache, budget, history, executor)."""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

from toolchain.core.subnetwork import SubNetwork
from toolchain.search.executors import LocalExecutor
from toolchain.search.history import SearchHistory
from toolchain.search.objectives import (
    METRICS,
    BudgetExhausted,
    HistoryError,
    SearchError,
    check_constraints,
    check_objectives,
    feasibility,
)


class CandidateStore:
    """The one place where candidates are scored: a cache by ``subnet.key()``, the budget, the history and the bar.

    :meth:`batch` takes the candidates a search proposes at once (an NSGA-II generation, a batch of random samples)
    and returns their records, in order (dicts: ``index``, ``key``, ``subnet``, the metric values, ``feasible``,
    ``violation``, ...). A candidate seen before in this search is returned from the cache; one found in the
    history file is reused without calling ``evaluate``; the new ones are handed to the executor's pool together
    (in parallel on Ray, one after the other locally) and recorded, and written to the history, in the order they
    were proposed, each as soon as it and those before it are done. Calling the object with one sub-network is
    ``batch([subnet])[0]``. Only this driver-side object writes the history: the pool only runs ``evaluate``.

    Each *distinct* candidate the search visits counts once against ``n_evals``; a batch that would visit more is cut
    after the last one that fits (those are evaluated and recorded), then :class:`BudgetExhausted` is raised; the
    same happens for a new candidate proposed after ``max_seconds`` (checked as a batch is planned).
    """

    def __init__(
        self,
        evaluate: Callable[[SubNetwork], Mapping[str, float]],
        *,
        objectives: Sequence[str] = ("error", "latency"),
        constraints: Mapping[str, float] | None = None,
        history: SearchHistory | None = None,
        n_evals: int | None = None,
        max_seconds: float | None = None,
        progress=None,
        executor=None,
        on_evaluated: Callable[[dict], None] | None = None,
    ):
        self.evaluate = evaluate
        self.objectives = check_objectives(objectives)
        self.constraints = check_constraints(constraints)
        self.needed = tuple(dict.fromkeys(self.objectives + tuple(self.constraints)))
        self.history = history
        self.n_evals = n_evals
        self.max_seconds = max_seconds
        self.progress = progress
        self.executor = executor if executor is not None else LocalExecutor()
        self.pool = None  # made on the first new candidate (a Ray pool starts its actors then)
        self.on_evaluated = on_evaluated
        self.known: dict[str, dict] = dict(history.rows) if history is not None else {}
        self.visited: list[dict] = []
        self._visited_keys: set[str] = set()
        self.n_new = 0
        self.eval_seconds = 0.0  # sum of the candidates' own evaluation times (where they ran)
        self.wait_seconds = 0.0  # wall time this process spent waiting for new results
        self.start = time.perf_counter()

    def space_exhausted(self, size: int) -> bool:
        return len(self.visited) >= size

    def seen(self, subnet: SubNetwork) -> bool:
        return subnet.key() in self._visited_keys

    @property
    def exhausted(self) -> bool:
        return self.n_evals is not None and len(self.visited) >= self.n_evals

    def __call__(self, subnet: SubNetwork) -> dict:
        return self.batch([subnet])[0]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _plan(self, subnets: Sequence[SubNetwork]):
        """``(plan, stop)``: what to do with each candidate (``seen`` / ``known`` / ``new``) up to the budget."""
        plan: list[tuple[str, SubNetwork, str]] = []
        planned: set[str] = set()
        stop = None
        for subnet in subnets:
            key = subnet.key()
            if key in self._visited_keys or key in planned:
                plan.append(("seen", subnet, key))
                continue
            if self.n_evals is not None and len(self.visited) + len(planned) >= self.n_evals:
                stop = BudgetExhausted(f"n_evals={self.n_evals}")
                break
            if self.max_seconds is not None and time.perf_counter() - self.start >= self.max_seconds:
                stop = BudgetExhausted(f"max_seconds={self.max_seconds}")
                break
            planned.add(key)
            plan.append(("known" if key in self.known else "new", subnet, key))
        return plan, stop

    def batch(self, subnets: Sequence[SubNetwork]) -> list[dict]:
        plan, stop = self._plan(subnets)
        new = [subnet for kind, subnet, _ in plan if kind == "new"]
        results = iter(())
        if new:
            if self.pool is None:
                self.pool = self.executor.pool(self.evaluate)
            results = self.pool.map(new)
        records = []
        try:
            for kind, subnet, key in plan:
                if kind == "seen":
                    records.append(self.known[key])
                    continue
                if kind == "known":
                    record = self._reuse(key)
                else:
                    t0 = time.perf_counter()
                    values, dt = next(results)
                    self.wait_seconds += time.perf_counter() - t0
                    record = self._record_new(subnet, key, values, dt)
                self.visited.append(record)
                self._visited_keys.add(key)
                records.append(record)
                if self.progress is not None:
                    self.progress.update(1)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # an error part-way: stop what is still running
        if stop is not None:
            raise stop
        return records

    def _reuse(self, key: str) -> dict:
        record = self.known[key]
        missing = [m for m in self.needed if m not in record]
        if missing:
            where = self.history.path if self.history is not None else "the history"
            raise HistoryError(
                f"{where}, row {record['index']}: no {', '.join(missing)} value; the history was written by a "
                "search with other objectives or constraints. Delete it or choose another run folder."
            )
        record.update(feasibility(record, self.constraints))
        return record

    def _record_new(self, subnet: SubNetwork, key: str, values, dt: float) -> dict:
        if not isinstance(values, Mapping):
            raise SearchError(f"evaluate() must return a dict of metric values, got {type(values).__name__}")
        missing = [m for m in self.needed if m not in values]
        if missing:
            raise SearchError(f"evaluate() returned no {', '.join(missing)} for {subnet} "
                              f"(it returned: {', '.join(values) or 'nothing'})")
        record: dict = {"index": self.history.n_rows if self.history is not None else len(self.known), "key": key,
                        "subnet": subnet}
        extra = {}
        for name, value in values.items():
            if name in METRICS:
                value = float(value)
                if not math.isfinite(value):
                    raise SearchError(f"evaluate() returned {name}={value} for {subnet}")
                record[name] = value
            else:
                try:
                    extra[str(name)] = float(value)
                except (TypeError, ValueError):
                    extra[str(name)] = str(value)
        record["extra"] = extra
        record.update(feasibility(record, self.constraints))
        record["eval_seconds"] = dt
        record["time"] = time.time()
        self.n_new += 1
        self.eval_seconds += dt
        self.known[key] = record
        if self.history is not None:
            self.history.append(record)
        if self.on_evaluated is not None:
            self.on_evaluated(record)
        return record
