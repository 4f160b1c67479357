"""The search as a pymoo problem: :class:`PruningProblem` only evaluates (through a candidate store); the
algorithm (:mod:`toolchain.search.methods`) only proposes."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from pymoo.core.problem import Problem

from toolchain.core.search_space import SearchSpace
from toolchain.search.candidates import CandidateStore
from toolchain.search.objectives import violations


class PruningProblem(Problem):
    """A pymoo problem over a search space's encoding (integers, or booleans for LARGE / LAYER).

    ``F`` = the chosen objectives (all minimised); ``G`` = ``value / limit - 1`` per constraint (pymoo's ``G <= 0``
    is feasible). ``evaluate`` is either a plain callable ``subnet -> dict`` (wrapped in a cache by
    ``subnet.key()``) or a :class:`CandidateStore`; no sub-network is evaluated twice.
    """

    def __init__(self, space: SearchSpace, evaluate, objectives: Sequence[str] = ("error", "latency"),
                 constraints: Mapping[str, float] | None = None):
        if isinstance(evaluate, CandidateStore):
            self.store = evaluate
        else:
            self.store = CandidateStore(evaluate, objectives=objectives, constraints=constraints)
        self.space = space
        self.objectives = self.store.objectives
        self.constraints = self.store.constraints
        xl, xu = space.bounds
        super().__init__(n_var=space.n_var, n_obj=len(self.objectives), n_ieq_constr=len(self.constraints),
                         xl=np.asarray(xl), xu=np.asarray(xu), vtype=space.vtype)

    def record(self, x) -> dict:
        return self.store(self.space.decode(x))

    def _evaluate(self, X, out, *args, **kwargs):
        records = self.store.batch([self.space.decode(x) for x in X])  # one generation: one batch
        out["F"] = np.array([[r[o] for o in self.objectives] for r in records], dtype=float).reshape(len(X), -1)
        if self.constraints:
            out["G"] = np.array([violations(r, self.constraints) for r in records], dtype=float).reshape(len(X), -1)
