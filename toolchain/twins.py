"""The twins of a point about to be shipped (issue #17): recover them beside it, export the best by validation metric.

With the same recovery, a plain uniform shrink (the same share of heads and FFN units in every layer) recovered to
more than the point NAS picked from its shared-weight front at most budgets below 75 % of the unpruned latency
(``benchmarks/bench_equal_recovery.py``, sections ``bench_equal_recovery``, ``-second`` and ``-mrpc`` of
docs/benchmarks.md): the shared-weight score the search ranks by is not the score after recovery. So before a
search's point is exported, its *uniform twin* -- the largest uniform network of the search space that the latency
table predicts no slower than the point and that meets the search's constraints -- is recovered too
(:func:`toolchain.recover.recover_point`, cached like any recovered point), and whichever of the two scores higher
on the validation set in recovery (see below) is exported (the point on a tie). The choice is recorded in the exported
point's ``nasprune.json`` (``extra.uniform_twin``). One recovery more per point tried; ``--no-uniform-twin`` turns
it off.

Its *Fisher twin* is the mask of retraining-free pruning (Kwon et al., :mod:`toolchain.rfp`: diagonal Fisher search
and per-layer rearrangement, on the super-network's full network, gradients once per run) at the point's predicted
latency. Recovered the same way, it was the best of NAS's point, the uniform network and the mask at three of four
budgets on SST-2, but not on STS-B or QNLI as a custom CSV (section ``bench_equal_recovery`` and its ``-stsb`` and
``-custom-csv``): no one structure wins everywhere, so all three are tried and the best on the validation set is
exported. Its figures go beside the uniform twin's in the same note (``fisher``, ``fisher_subnet``,
``fisher_latency_ms``; ``chosen``: ``point``, ``twin`` or ``fisher``); ``--no-fisher-twin`` turns it off.

Trying a candidate does not mean recovering it to the end: each is recovered for the first ``settings.screen`` share
of its steps (a quarter by default; :func:`toolchain.recover.screen_point`) and scored on the validation set
(``<name>_screen_score``, ``screen_steps`` = [step, of steps]); only the leader is recovered to the end
(``<name>_score_after_recovery``), going on from where its screening stopped, so it ends with the weights a recovery
without the stop gives. On the three compiles of ``benchmarks/bench_screening.py`` (docs/benchmarks.md: SST-2, STS-B,
QNLI as a custom CSV) the leader after a quarter was the leader at the end in 7 of 8 groups (the miss cost 0.0065
Spearman); it costs 1.5 recoveries a point of three candidates instead of 3.
``settings.screen = 1``: every candidate recovered to the end and the best after recovery exported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from toolchain.core.subnetwork import SubNetwork, uniform_subnet
from toolchain.recover import RecoverSettings, drop_checkpoint, recover_point, screen_point
from toolchain.rfp import MaskGradients, mask_gradients, rearrange_mask, search_mask
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
    twin = largest_uniform(run, costs, lambda c: _no_slower_and_feasible(c, mine, constraints))
    return None if twin == subnet else twin


def _no_slower_and_feasible(c: dict, mine: dict, constraints: dict[str, float]) -> bool:
    """Costs ``c`` predict no slower than ``mine`` (``latency``, and ``latency_bound`` when there is one) and meet
    ``constraints``."""
    return all(c[k] <= mine[k] for k in ("latency", "latency_bound") if k in mine) and feasibility(
        c, constraints)["feasible"]


def fisher_gradients(run: Run, n_samples: int, seed: int = 0, progress: bool = True) -> MaskGradients:
    """Retraining-free pruning's mask gradients of the super-network's full network on ``n_samples`` training
    examples (seeded)."""
    train = run.encoded("train", max_samples=n_samples, seed=seed)
    return mask_gradients(run.supernet.model, train, run.spec, n_samples=n_samples, seed=seed, progress=progress)


def fisher_mask(grads: MaskGradients, budget: float, cost: Callable[[SubNetwork], float]) -> SubNetwork | None:
    """Retraining-free pruning's mask with ``cost`` at most ``budget`` (:func:`~toolchain.rfp.search_mask`, then
    :func:`~toolchain.rfp.rearrange_mask`); ``None`` when even removing every head and unit costs more."""
    try:
        return rearrange_mask(grads, search_mask(grads, budget, cost))
    except ValueError:  # no mask that cheap
        return None


def fisher_twin(run: Run, subnet: SubNetwork, costs: Callable[[SubNetwork], dict], constraints: dict[str, float],
                grads: MaskGradients) -> SubNetwork | None:
    """Retraining-free pruning's mask (:func:`~toolchain.rfp.search_mask`, then
    :func:`~toolchain.rfp.rearrange_mask`) with ``costs``' ``latency`` at most ``subnet``'s, when it is no slower by
    ``latency_bound`` too and feasible under ``constraints``; ``None`` otherwise, or when it is ``subnet``."""
    mine = costs(subnet)
    mask = fisher_mask(grads, mine["latency"], lambda s: costs(s)["latency"])
    fits = mask is not None and _no_slower_and_feasible(costs(mask), mine, constraints)
    return mask if fits and mask != subnet else None


class TwinChooser:
    """``chooser(record)``: a front record (``subnet``, ``latency``, ``memory``, ``error``, ``score``, ...), or the
    record of its uniform or Fisher twin when that twin scores highest on the validation set after the screening share
    of its recovery (after all of it when ``settings.screen`` is 1). A twin already handed out (the twin of an earlier
    point) is not handed out again; the full network has no twin. ``chosen`` maps each point's key to the
    key of the sub-network given in its place."""

    def __init__(self, run: Run, costs: Callable[[SubNetwork], dict], constraints: dict[str, float],
                 settings: RecoverSettings, progress: bool = True, *, uniform: bool = True,
                 fisher_samples: int | None = None):
        self.run, self.costs, self.constraints = run, costs, constraints
        self.settings, self.progress = settings, progress
        self.uniform, self.fisher_samples = uniform, fisher_samples  # fisher_samples None: no Fisher twin
        self.chosen: dict[str, str] = {}
        self._grads: MaskGradients | None = None

    def grads(self) -> MaskGradients:
        """The mask gradients of the super-network's full network (once per chooser)."""
        if self._grads is None:
            self._grads = fisher_gradients(self.run, self.fisher_samples, self.settings.seed, self.progress)
        return self._grads

    def __call__(self, record: dict) -> dict:
        subnet: SubNetwork = record["subnet"]
        out = self._choose(record) if subnet != self.run.supernet.full() else record
        self.chosen[subnet.key()] = out["subnet"].key()
        return out

    def _choose(self, record: dict) -> dict:
        subnet = record["subnet"]
        handed = set(self.chosen.values())  # a twin handed out already is not handed out again
        twins = {}
        if self.uniform:
            twins["twin"] = uniform_twin(self.run, subnet, self.costs, self.constraints)
        if self.fisher_samples:
            twins["fisher"] = fisher_twin(self.run, subnet, self.costs, self.constraints, self.grads())
        twins = {name: t for name, t in twins.items() if t is not None and t.key() not in handed}
        if twins.get("fisher") is not None and twins["fisher"] == twins.get("twin"):
            del twins["fisher"]
        if not twins:
            return record
        candidates = {"point": subnet, **twins}
        costs = {name: self.costs(t) for name, t in twins.items()}
        note = {"point": subnet.key(), "point_latency_ms": record.get("latency")}
        for name, t in twins.items():
            note.update({name: t.key(), f"{name}_subnet": t.to_dict(), f"{name}_latency_ms": costs[name]["latency"]})
        if self.settings.screen < 1.0:  # rank after a share of the recovery, recover only the best to the end
            screened = {name: screen_point(self.run, s, self.settings, progress=self.progress)
                        for name, s in candidates.items()}
            note.update({f"{name}_screen_score": r["score"] for name, r in screened.items()},
                        screen_steps=[screened["point"]["step"], screened["point"]["total_steps"]])
            best = max(screened, key=lambda name: screened[name]["score"])  # the first of equals: the point
            after = {best: recover_point(self.run, candidates[best], self.settings, progress=self.progress).info}
            for name, s in candidates.items():  # the others' screenings left checkpoints: not to be chosen here
                if name != best:
                    drop_checkpoint(self.run, s, self.settings)
        else:  # every candidate recovered to the end
            after = {name: recover_point(self.run, s, self.settings, progress=self.progress).info
                     for name, s in candidates.items()}
            best = max(after, key=lambda name: after[name]["score_after"])
        note.update({f"{name}_score_after_recovery": a["score_after"] for name, a in after.items()},
                    metric=after[best]["metric"])
        ranked = {n: note.get(f"{n}_screen_score", note.get(f"{n}_score_after_recovery")) for n in candidates}
        log.info("%s: %s -> exporting the %s (%s %.4f after recovery)", subnet.key(),
                 ", ".join(f"{n} {v:.4f}" for n, v in ranked.items()), best, after[best]["metric"],
                 after[best]["score_after"])
        if best == "point":
            return {**record, "uniform_twin": {**note, "chosen": "point"}}
        twin, c = twins[best], costs[best]
        score = after[best]["score_before"]  # shared weights, full validation set: what validate_front gives a point
        return {**c, "subnet": twin, "key": twin.key(), "error": 1 - score, "score": score,
                "search_error": None, "uniform_twin": {**note, "chosen": best}}
