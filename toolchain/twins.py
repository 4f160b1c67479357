"""The uniform twin of a point about to be shipped (issue #17): recover both, export the better by validation metric.

With the same recovery, a plain uniform shrink (the same share of heads and FFN units in every layer) recovered to
more than the point NAS picked from its shared-weight front at most budgets below 75 % of the unpruned latency
(``benchmarks/bench_equal_recovery.py``, sections ``bench_equal_recovery``, ``-second`` and ``-mrpc`` of
docs/benchmarks.md): the shared-weight score the search ranks by is not the score after recovery. So before a
search's point is exported, its *uniform twin* -- the largest uniform network of the search space that the latency
table predicts no slower than the point and that meets the search's constraints -- is recovered too
(:func:`toolchain.recover.recover_point`, cached like any recovered point), and whichever of the two scores higher
on the validation set after recovery is exported (the point on a tie). The choice is recorded in the exported
point's ``nasprune.json`` (``extra.uniform_twin``). One recovery more per point tried; ``--no-uniform-twin`` turns
it off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from toolchain.core.subnetwork import SubNetwork, uniform_subnet
from toolchain.recover import RecoverSettings, recover_point
from toolchain.run import Run
from toolchain.search.objectives import feasibility

log = logging.getLogger(__name__)

#: the shares of heads and FFN units a twin is chosen from (1 %, 2 %, ..., 100 %)
SHARES = tuple(r / 100 for r in range(1, 101))


def largest_uniform(run: Run, costs: Callable[[SubNetwork], dict],
                    fits: Callable[[dict], bool]) -> SubNetwork | None:
    """The uniform member of the run's search space (one share of :data:`SHARES` of the heads and FFN units in every
    layer) with the highest ``costs(...)["latency"]`` among those whose costs ``fits``; ``None`` when none does."""
    best, best_latency = None, -1.0
    for share in SHARES:
        uniform = uniform_subnet(run.supernet.dims, share)
        try:
            run.space.encode(uniform)
        except ValueError:  # not a member of the search space (e.g. LAYER)
            continue
        c = costs(uniform)
        if fits(c) and c["latency"] > best_latency:
            best, best_latency = uniform, c["latency"]
    return best


def uniform_twin(run: Run, subnet: SubNetwork, costs: Callable[[SubNetwork], dict],
                 constraints: dict[str, float]) -> SubNetwork | None:
    """The largest uniform member of the run's search space predicted no slower than ``subnet`` (``costs``'
    ``latency``, and ``latency_bound`` when it has one) and feasible under ``constraints``; ``None`` when there is
    none or it is ``subnet`` itself."""
    mine = costs(subnet)
    twin = largest_uniform(run, costs, lambda c: all(c[k] <= mine[k] for k in ("latency", "latency_bound") if k in mine)
                           and feasibility(c, constraints)["feasible"])
    return None if twin == subnet else twin


class TwinChooser:
    """``chooser(record)``: a front record (``subnet``, ``latency``, ``memory``, ``error``, ``score``, ...), or the
    record of its uniform twin when the twin scores higher after recovery. A twin already handed out (the twin of an
    earlier point) is not handed out again; the full network has no twin. ``chosen`` maps each point's key to the
    key of the sub-network given in its place."""

    def __init__(self, run: Run, costs: Callable[[SubNetwork], dict], constraints: dict[str, float],
                 settings: RecoverSettings, progress: bool = True):
        self.run, self.costs, self.constraints = run, costs, constraints
        self.settings, self.progress = settings, progress
        self.chosen: dict[str, str] = {}

    def __call__(self, record: dict) -> dict:
        subnet: SubNetwork = record["subnet"]
        out = self._choose(record) if subnet != self.run.supernet.full() else record
        self.chosen[subnet.key()] = out["subnet"].key()
        return out

    def _choose(self, record: dict) -> dict:
        subnet = record["subnet"]
        twin = uniform_twin(self.run, subnet, self.costs, self.constraints)
        if twin is None or twin.key() in self.chosen.values():  # handed out already
            return record
        mine = recover_point(self.run, subnet, self.settings, progress=self.progress).info
        theirs = recover_point(self.run, twin, self.settings, progress=self.progress).info
        c = self.costs(twin)
        note = {"point": subnet.key(), "point_score_after_recovery": mine["score_after"],
                "point_latency_ms": record.get("latency"), "twin": twin.key(), "twin_subnet": twin.to_dict(),
                "twin_score_after_recovery": theirs["score_after"], "twin_latency_ms": c["latency"],
                "metric": mine["metric"]}
        won = theirs["score_after"] > mine["score_after"]
        log.info("%s %s: %.4f after recovery; its uniform twin %s (%.2f ms predicted, not slower): %.4f -> exporting "
                 "the %s", subnet.key(), mine["metric"], mine["score_after"], twin.key(), c["latency"],
                 theirs["score_after"], "twin" if won else "point")
        if not won:
            return {**record, "uniform_twin": {**note, "chosen": "point"}}
        score = theirs["score_before"]  # shared weights, full validation set: what validate_front gives a point
        return {**c, "subnet": twin, "key": twin.key(), "error": 1 - score, "score": score,
                "search_error": None, "uniform_twin": {**note, "chosen": "twin"}}
