"""The search methods. Each proposes candidates and leaves scoring to a
:class:`~toolchain.search.candidates.CandidateStore`; each returns why it stopped.

* :func:`nsga2_search`: pymoo's NSGA-II, one generation per batch, starting from :func:`initial_population`;
* :func:`random_search`: uniform samples (the baseline);
* :func:`local_search`: Klein et al.'s multi-objective local search around the front (:func:`mutate`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import BinaryRandomSampling, IntegerRandomSampling

from toolchain.core.search_space import SearchSpace
from toolchain.core.subnetwork import SubNetwork, layer_drop_subnet, uniform_subnet
from toolchain.search.candidates import CandidateStore
from toolchain.search.objectives import BudgetExhausted
from toolchain.search.pareto import constrained_front
from toolchain.search.problem import PruningProblem

#: stop when the algorithm proposes only already-seen candidates this many times in a row (space exhausted)
MAX_STALE_GENERATIONS = 20
MAX_STALE_SAMPLES = 2000


def space_size(space: SearchSpace) -> int:
    """Number of members of ``space`` (its encoding is a bijection)."""
    lo, hi = space.bounds
    return math.prod(int(h) - int(l) + 1 for l, h in zip(lo, hi))


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


def nsga2_search(space: SearchSpace, store: CandidateStore, seed: int, pop_size: int = 20) -> str:
    """pymoo's NSGA-II over ``space``'s encoding (a :class:`PruningProblem`), asked and told one generation at a time
    until the budget, the space or new proposals run out."""
    problem = PruningProblem(space, store)
    if space.vtype is bool:
        operators = dict(sampling=BinaryRandomSampling(), crossover=TwoPointCrossover(), mutation=BitflipMutation())
    else:  # integer encoding: SBX + PM on floats, rounded by a repair (pymoo's recipe for discrete variables)
        operators = dict(
            sampling=IntegerRandomSampling(),
            crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
            mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        )
    operators["sampling"] = initial_population(space, pop_size, seed)
    algorithm = NSGA2(pop_size=pop_size, eliminate_duplicates=True, seed=seed, **operators)
    algorithm.setup(problem, termination=NoTermination(), seed=seed, verbose=False)
    evaluator = Evaluator()
    size = space_size(space)
    stale = 0
    while True:
        infills = algorithm.ask()
        before = len(store.visited)
        if infills is None or len(infills) == 0:
            stale += 1
        else:
            try:
                evaluator.eval(problem, infills)
            except BudgetExhausted as e:
                return f"budget ({e})"
            algorithm.tell(infills=infills)
            stale = stale + 1 if len(store.visited) == before else 0
        if store.exhausted:
            return f"budget (n_evals={store.n_evals})"
        if store.space_exhausted(size):
            return "every member of the search space evaluated"
        if stale >= MAX_STALE_GENERATIONS:
            return f"no new candidates in {stale} generations"


def _new_batch(store: CandidateStore, size: int, batch_size: int, propose: Callable[[], SubNetwork],
               misses: int) -> tuple[list[SubNetwork], int]:
    """Up to ``batch_size`` distinct candidates from ``propose()`` not visited yet (no more than the budget and the
    space have room for), and the updated count of consecutive proposals that were not new (stop drawing at
    ``MAX_STALE_SAMPLES``)."""
    room = size - len(store.visited)
    if store.n_evals is not None:
        room = min(room, store.n_evals - len(store.visited))
    batch: list[SubNetwork] = []
    keys: set[str] = set()
    while len(batch) < min(batch_size, room) and misses < MAX_STALE_SAMPLES:
        subnet = propose()
        if store.seen(subnet) or subnet.key() in keys:
            misses += 1
            continue
        misses = 0
        batch.append(subnet)
        keys.add(subnet.key())
    return batch, misses


def random_search(space: SearchSpace, store: CandidateStore, seed: int, batch_size: int = 16) -> str:
    """Uniform samples, ``batch_size`` new ones at a time. Samples do not depend on results, so the candidates (and
    their order) are those of drawing and evaluating one at a time, whatever the batch size."""
    rng = np.random.default_rng(seed)
    size = space_size(space)
    misses = 0
    while True:
        if store.space_exhausted(size):
            return "every member of the search space evaluated"
        batch, misses = _new_batch(store, size, batch_size, lambda: space.sample(rng), misses)
        if batch:
            try:
                store.batch(batch)
            except BudgetExhausted as e:
                return f"budget ({e})"
        if misses >= MAX_STALE_SAMPLES:
            return f"no new candidates in {misses} samples"
        if store.exhausted:
            return f"budget (n_evals={store.n_evals})"


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


def local_search(space: SearchSpace, store: CandidateStore, seed: int, batch_size: int = 1) -> str:
    """Klein et al.'s multi-objective local search: start from the unpruned network; repeatedly pick a uniformly
    random member of the current (constrained) Pareto front of everything evaluated, and evaluate a random neighbour
    of it (:func:`mutate`). With ``batch_size`` > 1, each round draws that many (distinct, unseen) neighbours of
    members of the same front and evaluates them together before the front is updated: parallel workers get work,
    and the result depends on the batch size (not on the executor)."""
    rng = np.random.default_rng(seed)
    try:
        front = constrained_front([store(space.largest())], store.objectives)
    except BudgetExhausted as e:
        return f"budget ({e})"
    size = space_size(space)
    misses = 0
    while not store.exhausted:
        if store.space_exhausted(size):
            return "every member of the search space evaluated"
        batch, misses = _new_batch(store, size, batch_size, lambda: mutate(
            space, front[int(rng.integers(len(front)))]["subnet"], rng), misses)
        if batch:
            try:
                records = store.batch(batch)
            except BudgetExhausted as e:
                return f"budget ({e})"
            front = constrained_front(front + records, store.objectives)
        if misses >= MAX_STALE_SAMPLES:
            return f"no new neighbours in {misses} samples"
    return f"budget (n_evals={store.n_evals})"
