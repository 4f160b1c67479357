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

Entry point: :func:`run_search`. Building blocks: :class:`PruningProblem` (a pymoo ``Problem`` over a space's
encoding), :class:`Evaluations` (cache + budget + history), :class:`SearchHistory`, :class:`SearchResult`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from pymoo.core.problem import Problem

from toolchain.search.hypervolume import REFERENCE_POINT, hypervolume, knee_index, normalise
from toolchain.core.search_space import SearchSpace
from toolchain.core.subnetwork import SubNetwork, layer_drop_subnet, uniform_subnet

log = logging.getLogger(__name__)

METRICS = ("error", "latency", "memory", "params")
CONSTRAINT_METRICS = ("latency", "memory", "params")
UNITS = {"latency": "ms", "memory": "MB", "params": ""}
METHODS = ("nsga2", "random", "local")
HISTORY_FILE = "search_history.csv"
HISTORY_COLUMNS = (
    "index", "key", "subnet", "error", "latency", "memory", "params",
    "feasible", "violation", "extra", "eval_seconds", "time",
)
#: stop when the algorithm proposes only already-seen candidates this many times in a row (space exhausted)
MAX_STALE_GENERATIONS = 20
MAX_STALE_SAMPLES = 2000


class SearchError(ValueError):
    """A search that cannot run as asked, with a message for the user."""


class HistoryError(SearchError):
    """A ``search_history.csv`` that cannot be resumed from."""


class BudgetExhausted(Exception):
    """Raised by :class:`Evaluations` when a new candidate would exceed ``n_evals`` or ``max_seconds``."""


# ---------------------------------------------------------------------------------------------------- helpers
def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _violation(values: Mapping[str, float], constraints: Mapping[str, float]) -> np.ndarray:
    """pymoo inequality constraints G <= 0, relative to the limit: value / limit - 1."""
    return np.array([values[c] / limit - 1.0 for c, limit in constraints.items()], dtype=float)


def _check_objectives(objectives: Iterable[str]) -> tuple[str, ...]:
    objectives = tuple(objectives) if not isinstance(objectives, str) else (objectives,)
    if not objectives:
        raise SearchError("choose at least one objective from: " + ", ".join(METRICS))
    bad = [o for o in objectives if o not in METRICS]
    if bad:
        raise SearchError(f"unknown objective(s) {', '.join(bad)}; choose from: {', '.join(METRICS)}")
    if len(set(objectives)) != len(objectives):
        raise SearchError(f"objective listed twice: {', '.join(objectives)}")
    return objectives


def _check_constraints(constraints: Mapping[str, float | None] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, limit in (constraints or {}).items():
        if limit is None:
            continue
        if name not in CONSTRAINT_METRICS:
            raise SearchError(f"unknown constraint '{name}'; constraints exist for: {', '.join(CONSTRAINT_METRICS)}")
        limit = float(limit)
        if not math.isfinite(limit) or limit <= 0:
            raise SearchError(f"--max-{name} must be a positive number, got {limit}")
        out[name] = limit
    return out


def space_size(space: SearchSpace) -> int:
    """Number of members of ``space`` (its encoding is a bijection)."""
    lo, hi = space.bounds
    return math.prod(int(h) - int(l) + 1 for l, h in zip(lo, hi))


# ---------------------------------------------------------------------------------------------------- history
class SearchHistory:
    """``search_history.csv``: one row per evaluated candidate, written (and flushed) as it happens.

    Opening an existing file loads its rows (:attr:`rows`, key -> record) so a resumed search reuses them; a file
    that is not a search history (bad header, malformed rows, sub-networks of another space) raises
    :class:`HistoryError` naming the file. A last line cut off by a kill (no trailing newline) is dropped.
    """

    def __init__(self, path: Path | str, space: SearchSpace | None = None):
        path = Path(path)
        if path.is_dir() or path.suffix.lower() != ".csv":  # a run folder
            path = path / HISTORY_FILE
        self.path = path
        self.rows: dict[str, dict] = {}
        self.n_rows = 0
        self._load(space)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self.n_rows == 0 and self.path.stat().st_size == 0:
            self._writer.writerow(HISTORY_COLUMNS)
            self._file.flush()

    def _error(self, line: int | None, what: str) -> HistoryError:
        where = f"{self.path}" + (f", line {line}" if line is not None else "")
        return HistoryError(
            f"{where}: {what}. The file is not a resumable nasprune search history; "
            "delete it or choose another run folder."
        )

    def _load(self, space: SearchSpace | None) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(None, "not UTF-8 text") from None
        if not text.endswith("\n"):
            cut = text.rfind("\n")
            if cut < 0:
                raise self._error(1, "incomplete header")
            log.warning("%s: dropping an incomplete last line (the search was killed while writing it)", self.path)
            text = text[: cut + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(text.encode("utf-8")))
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            raise self._error(1, "no header") from None
        if tuple(header) != HISTORY_COLUMNS:
            raise self._error(1, f"unexpected header {','.join(header)!r} (expected {','.join(HISTORY_COLUMNS)!r})")
        try:
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                record = self._parse_row(row, line, space)
                self.rows.setdefault(record["key"], record)
                self.n_rows += 1
        except csv.Error as e:
            raise self._error(reader.line_num, f"malformed CSV ({e})") from None

    def _parse_row(self, row: list[str], line: int, space: SearchSpace | None) -> dict:
        if len(row) != len(HISTORY_COLUMNS):
            raise self._error(line, f"{len(row)} fields, expected {len(HISTORY_COLUMNS)}")
        d = dict(zip(HISTORY_COLUMNS, row))
        try:
            index = int(d["index"])
            if index != self.n_rows:
                raise ValueError(f"index {index} out of sequence (expected {self.n_rows})")
            subnet = SubNetwork.from_json(d["subnet"])
            if subnet.key() != d["key"]:
                raise ValueError(f"key {d['key']!r} does not match the sub-network")
            if space is not None:
                space.encode(subnet)  # raises if not a member of this space
                s = space.dims
                subnet.validate_for(s.num_layers, s.num_heads, s.intermediate_size)
            record: dict = {"index": index, "key": d["key"], "subnet": subnet}
            for m in METRICS:
                if d[m] != "":
                    value = float(d[m])
                    if not math.isfinite(value):
                        raise ValueError(f"{m} is {d[m]}")
                    record[m] = value
            if d["feasible"] not in ("0", "1"):
                raise ValueError(f"feasible must be 0 or 1, got {d['feasible']!r}")
            record["extra"] = json.loads(d["extra"]) if d["extra"] else {}
            if not isinstance(record["extra"], dict):
                raise ValueError("extra is not a JSON object")
            record["eval_seconds"] = float(d["eval_seconds"]) if d["eval_seconds"] else 0.0
            record["time"] = float(d["time"]) if d["time"] else 0.0
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise self._error(line, str(e)) from None
        return record

    def append(self, record: Mapping) -> None:
        extra = record.get("extra") or {}
        self._writer.writerow([
            record["index"], record["key"], record["subnet"].to_json(),
            *(_fmt(record.get(m)) for m in METRICS),
            int(bool(record["feasible"])), _fmt(record["violation"]),
            json.dumps(extra, separators=(",", ":"), sort_keys=True) if extra else "",
            _fmt(record["eval_seconds"]), _fmt(record["time"]),
        ])
        self._file.flush()
        self.n_rows += 1
        self.rows.setdefault(record["key"], dict(record))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ evaluations
class Evaluations:
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
        from toolchain.search.executors import LocalExecutor

        self.evaluate = evaluate
        self.objectives = _check_objectives(objectives)
        self.constraints = _check_constraints(constraints)
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
        record.update(self._feasibility(record))
        return record

    def _feasibility(self, values: Mapping[str, float]) -> dict:
        g = _violation(values, self.constraints)
        violation = float(np.maximum(g, 0.0).sum())
        return {"feasible": violation == 0.0, "violation": violation}

    def _record_new(self, subnet: SubNetwork, key: str, values, dt: float) -> dict:
        if not isinstance(values, Mapping):
            raise SearchError(f"evaluate() must return a dict of metric values, got {type(values).__name__}")
        missing = [m for m in self.needed if m not in values]
        if missing:
            raise SearchError(
                f"evaluate() returned no {', '.join(missing)} for {subnet} (it returned: {', '.join(values) or 'nothing'})"
            )
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
        record.update(self._feasibility(record))
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


# ---------------------------------------------------------------------------------------------------- problem
class PruningProblem(Problem):
    """A pymoo problem over a search space's encoding (integers, or booleans for LARGE / LAYER).

    ``F`` = the chosen objectives (all minimised); ``G`` = ``value / limit - 1`` per constraint (pymoo's ``G <= 0``
    is feasible). ``evaluate`` is either a plain callable ``subnet -> dict`` (wrapped in a cache by
    ``subnet.key()``) or an :class:`Evaluations`; no sub-network is evaluated twice.
    """

    def __init__(self, space: SearchSpace, evaluate, objectives: Sequence[str] = ("error", "latency"),
                 constraints: Mapping[str, float] | None = None):
        if isinstance(evaluate, Evaluations):
            self.evaluations = evaluate
        else:
            self.evaluations = Evaluations(evaluate, objectives=objectives, constraints=constraints)
        self.space = space
        self.objectives = self.evaluations.objectives
        self.constraints = self.evaluations.constraints
        xl, xu = space.bounds
        super().__init__(n_var=space.n_var, n_obj=len(self.objectives), n_ieq_constr=len(self.constraints),
                         xl=np.asarray(xl), xu=np.asarray(xu), vtype=space.vtype)

    def record(self, x) -> dict:
        return self.evaluations(self.space.decode(x))

    def _evaluate(self, X, out, *args, **kwargs):
        records = self.evaluations.batch([self.space.decode(x) for x in X])  # one generation: one batch
        out["F"] = np.array([[r[o] for o in self.objectives] for r in records], dtype=float).reshape(len(X), -1)
        if self.constraints:
            out["G"] = np.array([_violation(r, self.constraints) for r in records], dtype=float).reshape(len(X), -1)


# ---------------------------------------------------------------------------------------------------- methods
def ladder(space: SearchSpace, n: int) -> list[SubNetwork]:
    """``n`` members of ``space`` from the full network down to a tenth of it: the same share of heads and units in
    every layer, or (LAYER space) the first layers."""
    d = space.dims
    out: list[SubNetwork] = []
    for r in np.linspace(1.0, 0.1, n) if n > 1 else [1.0]:
        for s in (uniform_subnet(d, r), layer_drop_subnet(d, max(1, math.ceil(r * d.num_layers)))):
            try:
                space.encode(s)
            except ValueError:
                continue
            if s not in out:
                out.append(s)
            break
    return out


def initial_population(space: SearchSpace, pop_size: int, seed: int) -> np.ndarray:
    """NSGA-II's first generation: half a :func:`ladder` of uniformly shrunk networks, so the front spans the whole
    latency range from the start (a random population sits around half the network: random per-layer widths
    average out), half uniform random encodings (seeded)."""
    rng = np.random.default_rng([seed, 17])
    rows = [np.asarray(space.encode(s), dtype=float) for s in ladder(space, max(1, pop_size // 2))]
    lo, hi = (np.asarray(b) for b in space.bounds)
    while len(rows) < pop_size:
        if space.vtype is bool:
            rows.append((rng.random(space.n_var) < 0.5).astype(float))
        else:
            rows.append(rng.integers(lo, hi + 1).astype(float))
    X = np.array(rows[:pop_size])
    return X.astype(bool) if space.vtype is bool else X


def _nsga2(space: SearchSpace, problem: PruningProblem, pop_size: int, seed: int) -> str:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.termination import NoTermination

    if space.vtype is bool:
        from pymoo.operators.crossover.pntx import TwoPointCrossover
        from pymoo.operators.mutation.bitflip import BitflipMutation
        from pymoo.operators.sampling.rnd import BinaryRandomSampling

        operators = dict(sampling=BinaryRandomSampling(), crossover=TwoPointCrossover(), mutation=BitflipMutation())
    else:  # integer encoding: SBX + PM on floats, rounded by a repair (pymoo's recipe for discrete variables)
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        operators = dict(
            sampling=IntegerRandomSampling(),
            crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
            mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        )
    operators["sampling"] = initial_population(space, pop_size, seed)
    algorithm = NSGA2(pop_size=pop_size, eliminate_duplicates=True, seed=seed, **operators)
    algorithm.setup(problem, termination=NoTermination(), seed=seed, verbose=False)
    evaluations = problem.evaluations
    evaluator = Evaluator()
    size = space_size(space)
    stale = 0
    while True:
        infills = algorithm.ask()
        before = len(evaluations.visited)
        if infills is None or len(infills) == 0:
            stale += 1
        else:
            try:
                evaluator.eval(problem, infills)
            except BudgetExhausted as e:
                return f"budget ({e})"
            algorithm.tell(infills=infills)
            stale = stale + 1 if len(evaluations.visited) == before else 0
        if evaluations.exhausted:
            return f"budget (n_evals={evaluations.n_evals})"
        if evaluations.space_exhausted(size):
            return "every member of the search space evaluated"
        if stale >= MAX_STALE_GENERATIONS:
            return f"no new candidates in {stale} generations"


def _new_batch(evaluations: Evaluations, size: int, batch_size: int, propose: Callable[[], SubNetwork],
               misses: int) -> tuple[list[SubNetwork], int]:
    """Up to ``batch_size`` distinct candidates from ``propose()`` not visited yet (no more than the budget and the
    space have room for), and the updated count of consecutive proposals that were not new (stop drawing at
    ``MAX_STALE_SAMPLES``)."""
    room = size - len(evaluations.visited)
    if evaluations.n_evals is not None:
        room = min(room, evaluations.n_evals - len(evaluations.visited))
    batch: list[SubNetwork] = []
    keys: set[str] = set()
    while len(batch) < min(batch_size, room) and misses < MAX_STALE_SAMPLES:
        subnet = propose()
        if evaluations.seen(subnet) or subnet.key() in keys:
            misses += 1
            continue
        misses = 0
        batch.append(subnet)
        keys.add(subnet.key())
    return batch, misses


def _random(space: SearchSpace, evaluations: Evaluations, seed: int, batch_size: int = 16) -> str:
    """Uniform samples, ``batch_size`` new ones at a time. Samples do not depend on results, so the candidates (and
    their order) are those of drawing and evaluating one at a time, whatever the batch size."""
    rng = np.random.default_rng(seed)
    size = space_size(space)
    misses = 0
    while True:
        if evaluations.space_exhausted(size):
            return "every member of the search space evaluated"
        batch, misses = _new_batch(evaluations, size, batch_size, lambda: space.sample(rng), misses)
        if batch:
            try:
                evaluations.batch(batch)
            except BudgetExhausted as e:
                return f"budget ({e})"
        if misses >= MAX_STALE_SAMPLES:
            return f"no new candidates in {misses} samples"
        if evaluations.exhausted:
            return f"budget (n_evals={evaluations.n_evals})"


def non_dominated(points: Sequence[Mapping], objectives: Sequence[str]) -> list:
    """The points not dominated in ``objectives`` (all minimised; pymoo's non-dominated sorting), in input order."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not points:
        return []
    F = np.array([[p[o] for o in objectives] for p in points], dtype=float)
    keep = set(np.atleast_1d(NonDominatedSorting().do(F, only_non_dominated_front=True)).tolist())
    return [p for i, p in enumerate(points) if i in keep]


def best_under(points: Iterable[Mapping], budget: float, *, cost: str = "latency", score: str = "error"):
    """The point with the lowest ``score`` among those whose ``cost`` is within ``budget`` (ties: the cheaper);
    ``None`` when none fits."""
    fits = [p for p in points if p[cost] <= budget]
    return min(fits, key=lambda p: (p[score], p[cost])) if fits else None


def _front(records: list[dict], objectives: Sequence[str]) -> list[dict]:
    """Constrained Pareto front of ``records``: non-dominated feasible ones, or the least-violating if none."""
    feasible = [r for r in records if r["feasible"]]
    if feasible:
        pool = feasible
    else:
        least = min(r["violation"] for r in records)
        pool = [r for r in records if r["violation"] == least]
    return non_dominated(pool, objectives)


def mutate(space: SearchSpace, subnet: SubNetwork, rng: np.random.Generator) -> SubNetwork:
    """One random neighbour: one encoding variable (uniformly chosen) changed to a different uniform value
    (a flipped bit in boolean spaces)."""
    x = np.array(space.encode(subnet))
    lo, hi = (np.asarray(b) for b in space.bounds)
    free = np.flatnonzero(hi > lo)
    if len(free) == 0:
        return subnet
    j = int(free[rng.integers(len(free))])
    if space.vtype is bool:
        x = x.astype(bool)
        x[j] = not x[j]
    else:
        v = int(rng.integers(lo[j], hi[j]))  # a value in [lo, hi) ...
        x[j] = v + 1 if v >= x[j] else v  # ... shifted past the current one: uniform over the others
    return space.decode(x)


def _local(space: SearchSpace, evaluations: Evaluations, seed: int, batch_size: int = 1) -> str:
    """Klein et al.'s multi-objective local search: start from the unpruned network; repeatedly pick a uniformly
    random member of the current (constrained) Pareto front of everything evaluated, and evaluate a random neighbour
    of it (:func:`mutate`). With ``batch_size`` > 1, each round draws that many (distinct, unseen) neighbours of
    members of the same front and evaluates them together before the front is updated: parallel workers get work,
    and the result depends on the batch size (not on the executor)."""
    rng = np.random.default_rng(seed)
    try:
        front = _front([evaluations(space.largest())], evaluations.objectives)
    except BudgetExhausted as e:
        return f"budget ({e})"
    size = space_size(space)
    misses = 0
    while not evaluations.exhausted:
        if evaluations.space_exhausted(size):
            return "every member of the search space evaluated"
        batch, misses = _new_batch(evaluations, size, batch_size, lambda: mutate(
            space, front[int(rng.integers(len(front)))]["subnet"], rng), misses)
        if batch:
            try:
                records = evaluations.batch(batch)
            except BudgetExhausted as e:
                return f"budget ({e})"
            front = _front(front + records, evaluations.objectives)
        if misses >= MAX_STALE_SAMPLES:
            return f"no new neighbours in {misses} samples"
    return f"budget (n_evals={evaluations.n_evals})"


# ----------------------------------------------------------------------------------------------------- result
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
        """Write :meth:`to_json` to ``path`` (a file, or a folder -> ``<folder>/pareto.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "pareto.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path


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


def _sort_key(objectives: Sequence[str]):
    order = [o for o in objectives if o != "error"] + [o for o in objectives if o == "error"]
    return lambda r: (*(r[o] for o in order), r["index"])


def summarize(records: list[dict], objectives: Sequence[str], normalizers: Mapping[str, float]):
    """(pareto records sorted by the first non-error objective, knee record, hypervolume) of ``records``."""
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
        return [], None, 0.0
    pareto = sorted(non_dominated(feasible, objectives), key=_sort_key(objectives))
    PF = np.array([[r[o] for o in objectives] for r in pareto], dtype=float)
    k = knee_index(normalise(PF, objectives, normalizers))
    return pareto, (pareto[k] if k is not None else None), hypervolume(PF, objectives, normalizers)


# ------------------------------------------------------------------------------------------------- entry point
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

    ``executor`` (:mod:`toolchain.search.executors`; default: local, in this process) runs the new candidates of each batch:
    on Ray, ``evaluate`` must be picklable and is shipped once to each worker. Batches are fixed by the method and
    ``batch_size``, never by the executor, so every executor visits the same candidates in the same order and
    returns the same Pareto set for the same seed (given a deterministic ``evaluate``). NSGA-II evaluates one
    generation (``pop_size`` candidates) per batch; random search draws ``batch_size`` (default 16) samples per
    batch, which does not change its candidates; local search mutates ``batch_size`` (default 1, the sequential
    algorithm) members of the front per round, which does. ``on_evaluated(record)`` is called here, in the driver,
    for each newly evaluated candidate (e.g. to keep a cache).
    """
    t0 = time.perf_counter()
    objectives = _check_objectives(objectives)
    constraints = _check_constraints(constraints)
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
    evaluations = Evaluations(evaluate, objectives=objectives, constraints=constraints, history=history,
                              n_evals=int(n_evals), max_seconds=max_seconds, progress=bar, executor=executor,
                              on_evaluated=on_evaluated)
    evaluations.start = t0
    try:
        need = [o for o in objectives if o != "error" and o not in normalizers]
        stop = ""
        if need:
            try:
                largest = evaluations(space.largest())
            except BudgetExhausted as e:
                stop = f"budget ({e})"
            else:
                for o in need:
                    if largest[o] <= 0:
                        raise SearchError(f"the unpruned network's {o} is {largest[o]}; cannot normalise by it")
                    normalizers[o] = largest[o]
        if not stop:
            if method == "nsga2":
                stop = _nsga2(space, PruningProblem(space, evaluations), int(pop_size), int(seed))
            elif method == "random":
                stop = _random(space, evaluations, int(seed), int(batch_size or 16))
            else:
                stop = _local(space, evaluations, int(seed), int(batch_size or 1))
    finally:
        evaluations.close()
        if bar is not None:
            bar.close()
        if history is not None:
            history.close()
    for o in objectives:
        if o not in normalizers and o != "error":  # only when the budget ran out before anything was evaluated
            normalizers[o] = float("nan")
    records = evaluations.visited
    if all(math.isfinite(normalizers.get(o, 1.0)) for o in objectives):
        pareto, knee, hv = summarize(records, objectives, normalizers)
    else:
        pareto, knee, hv = [], None, 0.0
    wall = time.perf_counter() - t0
    result = SearchResult(
        method=method, seed=int(seed), objectives=objectives, constraints=constraints, normalizers=normalizers,
        records=records, pareto=pareto, knee=knee, hypervolume=hv, wall_time=wall, n_new=evaluations.n_new,
        n_from_history=len(records) - evaluations.n_new, eval_seconds=evaluations.eval_seconds, stop_reason=stop,
        history_path=history.path if history is not None else None, wait_seconds=evaluations.wait_seconds,
        executor=evaluations.executor.name, workers=evaluations.executor.workers,
    )
    log.info("search %s: %d candidates (%d new), %d feasible, %d on the Pareto front, HV %.4f, %.1fs (%s)",
             method, len(records), result.n_new, len(result.feasible), len(pareto), hv, wall, stop)
    return result
