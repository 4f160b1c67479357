"""Which points are shipped: candidates in shipping order (:func:`export_order`), exported one after the other
until ``n_points`` of them meet the constraints when *measured* (:func:`select_and_export`).

Violators are reported and kept apart (``rejected/``); a candidate whose export fails is reported and skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from targets import same_device
from targets.meter import disturbed
from toolchain.core.pareto import non_dominated
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.export import ExportResult, export_point
from toolchain.ship.jsonfile import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A sub-network proposed for export, in preference order, with the latency model's predictions."""

    subnet: SubNetwork
    predicted: dict = field(default_factory=dict)  # latency_ms, memory_mb, error, ...
    extra: dict = field(default_factory=dict)
    precision: str | None = None  # None: the export's default (the ``precision`` given to select_and_export)


@dataclass
class Selection:
    shipped: list[ExportResult]
    rejected: list[tuple[ExportResult, str]]  # (export, why)
    failed: list[tuple[Candidate, str]]  # (candidate, error) -- export or verification failed
    exhausted: bool  # candidates ran out before n_points were shipped
    # (candidate, why) -- not exported: predicted over the budget beyond what its table ever mispredicted
    not_exported: list[tuple[Candidate, str]] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"shipped {len(self.shipped)} point(s)"]
        for r, why in self.rejected:
            lines.append(f"  not shipped: {r.point_id}: {why}")
        for c, err in self.failed:
            lines.append(f"  export failed: {c.subnet}: {err}")
        for c, why in self.not_exported:
            lines.append(f"  not exported: {c.subnet.key()} ({c.precision or 'the compile precision'}): {why}")
        if self.exhausted:
            lines.append("  candidates ran out before the requested number of feasible points was reached")
        return "\n".join(lines)


#: a point at most this much less accurate than the most accurate one is, to a user, as good as it (the anchors,
#: CoFi and nn_pruning, are read at 1-1.5 points): :func:`pick_points` ships the fastest such point
NEAR_BEST = 0.01
#: the same, before recovery (the search's front, shared weights): half of it, because a sub-network's gap to the
#: full network can carry over whole through recovery (0bf008bd4318: 1.15 points before, 1.14 after, in the
#: bench_compile-max-accuracy-drop-1pt section of docs/benchmarks.md)
NEAR_BEST_BEFORE_RECOVERY = 0.005


#: without an accuracy limit, a shipped point keeps at least this share of the unpruned model's margin over a model
#: that ignores its input (:meth:`~toolchain.ship.verify.MetricData.constant_score`): a default STS-B compile shipped,
#: as the fastest pick, a point at Spearman 0.30 against the unpruned 0.81 (nothing on its front scored higher than
#: 0.11 before recovery at that speed, and recovery could not rescue it)
SENSIBLE_SHARE = 0.5
SENSIBLE_REASON = ("the least metric worth shipping (half the unpruned model's margin over a constant prediction, "
                   "{:.4f})")


def sensible_floor(unpruned: float | None, constant: float) -> float | None:
    """The least metric worth shipping without an accuracy limit: :data:`SENSIBLE_SHARE` of the way from the
    ``constant`` predictor's score to the ``unpruned`` model's; ``None`` when the unpruned model does not beat it
    (then nothing is sensible by this measure, and nothing is held back)."""
    if unpruned is None or unpruned <= constant:
        return None
    return constant + SENSIBLE_SHARE * (unpruned - constant)


#: a candidate is not exported when its prediction times the smallest measured / predicted ratio of its table's
#: validation, less this margin, is still over the budget: no reading it could get would ship it. Under --max-latency
#: 3ms a default compile exported and measured the fp32 twins of its int8 points, predicted 3.5-4.7 ms, to reject
#: them; the rejections then drew fall-back sub-networks in, each recovered (731 s, against 436 s before)
UNREACHABLE_MARGIN = 0.05


def out_of_reach(predicted_ms: float | None, table, max_latency_ms: float | None) -> str | None:
    """Why a candidate predicted at ``predicted_ms`` by ``table`` cannot meet ``max_latency_ms`` (see
    :data:`UNREACHABLE_MARGIN`), or ``None``: it may (also without a budget, a prediction or validation residuals)."""
    if max_latency_ms is None or predicted_ms is None or table is None:
        return None
    residuals, _ = table.latency_residuals()
    if not residuals:
        return None
    ratio = 1.0 + min(residuals)
    best = predicted_ms * ratio * (1.0 - UNREACHABLE_MARGIN)
    if best <= max_latency_ms:
        return None
    return (f"predicted {predicted_ms:.2f} ms; at the smallest measured / predicted ratio of its table's validation "
            f"({ratio:.3f}) less {UNREACHABLE_MARGIN:.0%}, {best:.2f} ms > max {max_latency_ms:g} ms")


def export_order(front: list[dict], n: int, most_accurate: bool = True) -> list[dict]:
    """Search records in shipping order: the ``n`` points a user would pick from the non-dominated records (lowest
    ``error``, lowest ``latency``), chosen by :func:`pick_points` (the most accurate, the fastest sensible one, the
    fastest within :data:`NEAR_BEST_BEFORE_RECOVERY` of the most accurate, knees), then the rest as fall-backs, the
    lowest error first. ``most_accurate=False``: another point (the unpruned network in another precision) is the
    most accurate pick, so the ``n`` picks are the others, and the most accurate record is the first fall-back."""
    if not front:
        return []
    nd = sorted(non_dominated([{"i": i, "error": r["error"], "latency": r.get("latency", 0)}
                               for i, r in enumerate(front)], ("error", "latency")),
                key=lambda p: (p["latency"], p["error"]))  # fastest first
    chosen = pick_points([(-p["error"], p["latency"]) for p in nd], n if most_accurate else n + 1,
                         near=NEAR_BEST_BEFORE_RECOVERY)
    picks = [front[nd[j]["i"]] for j in (chosen if most_accurate else chosen[1:])]
    return picks + sorted((r for r in front if not any(r is q for q in picks)), key=lambda r: r["error"])


def measured_on_target(info: dict) -> bool:
    """Whether a point's measured figures (``info``: its ``nasprune.json``) come from the device its target is:
    false when the target stands for another device (a latency table measured there,
    :meth:`targets.Target.on_device`) and this machine measured them."""
    device = (info.get("target") or {}).get("fingerprint") or {}
    measured = info.get("measured") or {}
    where = [(measured.get(k) or {}).get("measured_on") for k in ("latency", "memory")]
    return all(same_device(device, w) for w in where if w)


def disturbed_reading(measured: dict) -> str | None:
    """Why a point's latency reading (``measured``: its ``nasprune.json["measured"]``) is the machine's state rather
    than the network's, or ``None``: the unpruned network measured beside it (after the retakes) read more than
    :data:`~targets.meter.QUIET_TOLERANCE` off the export's reference speed, either way (the measurement's own
    ``reference.disturbed``, :func:`targets.meter.disturbed`). Its budget is then judged by the drift-corrected
    figure: a transient load on a shared machine must not reject a point (one compile read 29.2 ms for a network
    predicted at 8.1 ms, the unpruned network beside it 46.3 ms against 14.7), nor a machine faster than usual pass
    one (there the drift-corrected figure is the higher)."""
    ref = measured.get("reference") or {}
    speed, beside = ref.get("speed_ms"), ref.get("latency_ms")
    if not speed or not beside or measured.get("latency_drift_corrected_ms") is None:
        return None
    if not ref.get("disturbed", disturbed(beside, speed)):  # (read by the criterion when it was not recorded)
        return None
    state = "busy" if beside > speed else "faster than usual"
    return f"the unpruned network read {beside:.2f} ms beside it against {speed:.2f} ms, the machine was {state}"


def constraint_violation(result: ExportResult, max_latency_ms: float | None, max_memory_mb: float | None) -> str | None:
    """Why a point breaks the constraints (``None`` if it meets them): by its figures measured on the target (its
    latency drift-corrected when the reading was the machine's state: :func:`disturbed_reading`, recorded in ``info`` as
    ``judged_drift_corrected``), or, when it was not measured on the target (:func:`measured_on_target`, recorded in
    ``info``), by the latency table's predictions."""
    on_target = result.info["measured_on_target"] = measured_on_target(result.info)
    predicted = result.info.get("predicted") or {}
    figures = (result.info.get("measured") or {}) if on_target else predicted
    word = "measured" if on_target else "predicted (not measured on the target)"
    why = []
    lat, mem = figures.get("latency_ms"), figures.get("memory_mb")
    lat_word = word
    state = disturbed_reading(figures) if on_target else None
    result.info["judged_drift_corrected"] = state is not None
    if state is not None:  # the unpruned network beside it read far off its usual speed: the raw reading is the
        lat, lat_word = figures["latency_drift_corrected_ms"], f"measured (drift-corrected: {state})"  # machine's
    if max_latency_ms is not None and lat is not None and lat > max_latency_ms:
        pred = predicted.get("latency_ms") if on_target else None
        why.append(f"{lat_word} latency {lat:.2f} ms > max {max_latency_ms:g} ms"
                   + (f" (predicted {pred:.2f} ms)" if pred is not None else ""))
    if max_memory_mb is not None and mem is not None and mem > max_memory_mb:
        why.append(f"{word} memory {mem:.1f} MB > max {max_memory_mb:g} MB")
    return "; ".join(why) or None


def select_and_export(
    candidates: Iterable[Candidate],
    n_points: int | Callable[[], int],
    max_latency_ms: float | None,
    *,
    model_or_supernet,
    tokenizer,
    run_dir: str | Path,
    max_memory_mb: float | None = None,
    min_metric: float | None = None,
    min_metric_reason: str = "the accuracy limit",
    keep_rejected: bool = True,
    export_fn: Callable[..., ExportResult] = export_point,
    on_outcome: Callable[[Candidate, ExportResult | None], None] | None = None,
    **export_kwargs,
) -> Selection:
    """Export ``candidates`` (ordered, best first) until ``n_points`` measured-feasible points are shipped (a
    callable: asked before each candidate, for a number that depends on the outcomes so far).

    Shipped points go to ``run_dir/points/<id>``. A point whose MEASURED latency exceeds ``max_latency_ms`` (or
    measured memory ``max_memory_mb``) is not shipped as feasible: it is logged, moved to ``run_dir/rejected/<id>``
    (``keep_rejected``; else deleted), ``nasprune.json["feasible"]`` says false, and the next candidate is tried.
    A point whose metric on the exported model is below ``min_metric`` (an accuracy limit, or the least metric
    worth shipping: ``min_metric_reason`` names it in the reason) is rejected the same way. A candidate whose export
    fails (e.g. verification) is reported and skipped. ``export_kwargs`` go to ``export_fn`` (default
    :func:`~toolchain.ship.export.export_point`). ``on_outcome(candidate, result)`` is
    called once a candidate is decided, before the next one is drawn (an order that depends on outcomes:
    :func:`bisect_fastest`), with its export if it is shipped, else ``None``.
    """
    run_dir = Path(run_dir)
    points_dir, rejected_dir = run_dir / "points", run_dir / "rejected"
    shipped: list[ExportResult] = []
    rejected: list[tuple[ExportResult, str]] = []
    failed: list[tuple[Candidate, str]] = []
    drawn = enumerate(candidates)
    # the count is asked before the next candidate is drawn: drawing one may cost minutes (its recovery beside its
    # uniform twin, toolchain.twins)
    while len(shipped) < (n_points() if callable(n_points) else n_points):
        rank, cand = next(drawn, (None, None))
        if cand is None:
            break
        pid = f"{rank:02d}-{cand.subnet.key()}" + (f"-{cand.precision}" if cand.precision else "")
        kwargs = {**export_kwargs, **({"precision": cand.precision} if cand.precision else {})}
        try:
            res = export_fn(model_or_supernet, cand.subnet, tokenizer, points_dir / pid,
                            predicted=cand.predicted, extra=cand.extra or None, point_id=pid, overwrite=True,
                            **kwargs)
        except Exception as e:  # noqa: BLE001 - report, try the next one
            log.error("candidate %s (%s) could not be exported: %s", pid, cand.subnet, e)
            failed.append((cand, f"{type(e).__name__}: {e}"))
            if on_outcome:
                on_outcome(cand, None)
            continue
        why = constraint_violation(res, max_latency_ms, max_memory_mb)
        score = (res.metric or {}).get("score")
        if min_metric is not None and (score is None or score < min_metric):
            low = f"metric {score:.4f}" if score is not None else "no metric"
            why = "; ".join(w for w in (why, f"{low} below {min_metric_reason} {min_metric:.4f}") if w)
        res.info["feasible"] = why is None
        res.info["infeasible_reason"] = why
        if on_outcome:
            on_outcome(cand, res if why is None else None)
        if why is None:
            write_json_atomic(res.path / "nasprune.json", res.info)
            shipped.append(res)
            log.info("shipped %s: %s", pid, _summary(res))
            continue
        log.warning("not shipping %s: %s; selecting the next candidate", pid, why)
        _reject(res, why, rejected_dir, keep_rejected)
        rejected.append((res, why))
    wanted = n_points() if callable(n_points) else n_points
    exhausted = len(shipped) < wanted
    if exhausted:
        log.warning("only %d of %d requested points meet the constraints when measured", len(shipped), wanted)
    return Selection(shipped, rejected, failed, exhausted)


def _reject(res: ExportResult, why: str, rejected_dir: Path, keep: bool = True) -> None:
    """Move an exported point out of ``points/``: to ``rejected/<id>`` with its reason (``keep``), or delete it."""
    res.info["feasible"], res.info["infeasible_reason"] = False, why
    if not keep:
        shutil.rmtree(res.path, ignore_errors=True)
        return
    rejected_dir.mkdir(parents=True, exist_ok=True)
    dest = rejected_dir / res.path.name
    if dest.exists():
        shutil.rmtree(dest)
    write_json_atomic(res.path / "nasprune.json", res.info)
    os.replace(res.path, dest)
    res.path = dest


def judged_latency(result: ExportResult) -> float | None:
    """The latency a point is judged by: its drift-corrected figure where the reading was the machine's state
    (``judged_drift_corrected``, :func:`check_constraints`), else what it measured. In one default compile a point
    read 3.79 ms while the unpruned network beside it read 24 % slower than usual (3.07 ms drift-corrected), and the
    raw figure had it dominated by a slower one."""
    meas = result.info.get("measured") or {}
    if result.info.get("judged_drift_corrected") and meas.get("latency_drift_corrected_ms") is not None:
        return meas["latency_drift_corrected_ms"]
    return result.measured_latency_ms


def keep_non_dominated(selection: Selection, n_points: int, run_dir: str | Path) -> Selection:
    """Across precisions, ship the Pareto set of (metric on the exported model, :func:`judged_latency`): a shipped point
    that another one beats on both is moved to ``rejected/``; of the rest at most ``n_points`` stay, chosen by
    :func:`pick_points` (the most accurate, the fastest sensible one, the fastest near the most accurate, knees)."""
    def key(r):
        return (r.metric or {}).get("score") or float("-inf"), judged_latency(r) or float("inf")

    points = [{"point": r, "loss": -key(r)[0], "latency": key(r)[1]} for r in selection.shipped]
    kept = [p["point"] for p in non_dominated(points, ("loss", "latency"))]
    dropped = []
    for r in selection.shipped:
        if any(r is k for k in kept):
            continue
        better = next(o for o in kept if key(o)[0] >= key(r)[0] and key(o)[1] <= key(r)[1])
        dropped.append((r, f"dominated by {better.point_id} (metric {key(better)[0]:.4f} at {key(better)[1]:.2f} ms)"))
    kept.sort(key=lambda r: key(r)[1])  # fastest first
    if len(kept) > n_points:
        picks = pick_points([(key(r)[0], key(r)[1]) for r in kept], n_points)
        dropped += [(r, "not among the points a user would pick (most accurate, fastest sensible, "
                                 "fastest within a point of the most accurate, knee)")
                    for i, r in enumerate(kept) if i not in picks]
        kept = [r for i, r in enumerate(kept) if i in picks]
    for r, why in dropped:
        log.info("not shipping %s: %s", r.point_id, why)
        _reject(r, why, Path(run_dir) / "rejected")
    kept.sort(key=lambda r: -key(r)[0])  # the most accurate first
    return Selection(kept, selection.rejected + dropped, selection.failed, selection.exhausted, selection.not_exported)


def pick_points(front: list[tuple[float, float]], n: int, *, close_ms: float = 0.5,
                much_better: float = 0.01, near: float = NEAR_BEST) -> list[int]:
    """Which of a non-dominated ``front`` of ``(metric, latency)`` pairs, fastest first, to ship when there are more
    than ``n`` (indices, in this order): the most accurate; the fastest that is not beaten by ``much_better``
    (1 point) or more by a point at most ``close_ms`` slower; the fastest at most ``near`` less accurate than the
    most accurate (what a user who can give up next to no accuracy would take); then knees, the points furthest
    above the line from that fastest point to the most accurate one (metric and latency scaled to [0, 1] between
    them)."""
    if not front or n < 1:
        return []
    last = len(front) - 1
    picks = [last]
    fast = next(i for i, (m, lat) in enumerate(front)
                if not any(m2 >= m + much_better and lat2 <= lat + close_ms for m2, lat2 in front[i + 1:]))
    if n > 1 and fast != last:
        picks.append(fast)
    close = next(i for i, (m, _) in enumerate(front) if m >= front[last][0] - near)
    if len(picks) < n and close not in picks:
        picks.append(close)
    (m0, l0), (m1, l1) = front[fast], front[last]

    def above_line(i: int) -> float:
        m, lat = front[i]
        return (m - m0) / ((m1 - m0) or 1.0) - (lat - l0) / ((l1 - l0) or 1.0)

    knees = sorted((i for i in range(fast + 1, last) if i not in picks), key=above_line, reverse=True)
    return picks + knees[: max(0, n - len(picks))]


def _summary(res: ExportResult) -> str:
    lat = res.measured_latency_ms
    return f"{res.parameters / 1e6:.2f}M params, " + (f"{lat:.2f} ms measured" if lat is not None else "no latency")


def bisect_fastest(items: list, passed: Callable[[object], bool]) -> Iterator:
    """``items`` sorted fastest first, under an accuracy limit that only trying an item tells (recover, export,
    score): a binary search for the fastest item that passes (``passed(item)``, asked after the item was yielded and
    tried), taking the slower points of a Pareto front to be the more accurate; then the items slower than it not
    tried yet, fastest first. About log2(n) tries to find it, where trying fastest first may need n."""
    lo, hi, best, tried = 0, len(items) - 1, len(items), set()
    while lo <= hi:
        mid = (lo + hi) // 2
        tried.add(mid)
        yield items[mid]
        if passed(items[mid]):
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    yield from (items[i] for i in range(best + 1, len(items)) if i not in tried)


#: how much recovery may lift a point's metric over its shared-weight score, for choosing what to try under an
#: accuracy limit: a margin above the lifts of the search's points seen so far (up to +0.052 on SST-2, NAS's points
#: in the bench_equal_recovery section of docs/benchmarks.md; the uniform networks there were lifted up to +0.094),
#: not a measured bound
RECOVERY_GAIN = 0.1


def front_floor(floor: float, metric: float | None, metric_dev: float | None) -> float:
    """The least shared-weight dev score (the front's) of a point worth trying under the accuracy limit ``floor``:
    ``floor`` is on what the exports are scored on (dev and unused training examples, toolchain.heldout), where the
    unpruned model reads ``metric`` against ``metric_dev`` on dev alone; the same distance below it on dev, less
    :data:`RECOVERY_GAIN`."""
    shift = metric - metric_dev if metric is not None and metric_dev is not None else 0.0
    return floor - shift - RECOVERY_GAIN


def fastest_first(front: list[dict], min_score: float) -> list[dict]:
    """Under an accuracy limit: the points of the front whose shared-weight ``score`` is at least ``min_score``
    (those recovery may lift over the limit), fastest first."""
    return sorted((r for r in front if r["score"] >= min_score), key=lambda r: r.get("latency", 0))


def closest_by_metric(front: list[dict]) -> str:
    best = sorted(front, key=lambda r: -r["score"])[:3]
    return "; ".join(f"metric {r['score']:.4f} at {r.get('latency', 0):.2f} ms predicted" for r in best) or "none"
