"""``nasprune-compile``: pre-trained model + task + target + budget -> shipped, verified ONNX sub-networks.

Stages (each cached or resumable), one function each; ``compile_model`` runs them all, and each stage command
(``nasprune search`` / ``export`` / ``evaluate`` / ``profile``) runs its own through the same functions:

1. latency table of the target (cached per target fingerprint and model dimensions; ``--latency-table`` to bring one)
2. super-network training (cached per model, data, space, strategy, seed and training budget)
3. search (NSGA-II by default; ``--method rfp``: :mod:`toolchain.rfp_stage`) with ``search_history.csv`` in the run
   folder (resumable)
4. Pareto points re-evaluated on the full validation set
5. export: (each point of the search recovered beside its uniform and Fisher twins, the best kept: :mod:`toolchain.twins`)
   slice -> recover -> ONNX -> fuse (-> int8) -> verify -> measure; a point over budget when *measured* is not shipped
6. report: ``manifest.json``, ``pareto.png``, ``report.html``

Stages 4-6 are :func:`ship_run`, for a compile and for ``nasprune export`` alike. The run is built in
``<output>.partial`` and renamed to ``<output>`` when complete, so a folder named like the output is always a
finished run. ``--resume`` continues a ``.partial`` folder; an existing output needs ``--overwrite``, which replaces
only a folder nasprune made (its ``.nasprune-run`` marker). Every input is checked (:meth:`CompileOptions.check`)
before any folder exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from latency_models.cache import cache_root, run_profiles
from targets import Target, load_target
from toolchain.core.atomic import write_json_atomic
from toolchain.core.subnetwork import SubNetwork
from toolchain.evaluation import Evaluator, SearchObjective, resolve_dtype
from toolchain.heldout import selection_metric
from toolchain.latency_settings import REPORT_LENGTHS, References, confidence_note, export_reference
from toolchain.options import CompileError, CompileOptions, InfeasibleError
from toolchain.recover import recover_point, recovery_summary
from toolchain.rfp_stage import point_supernet, rfp_scales, rfp_stage
from toolchain.run import (DataSettings, Run, RunError, check_output, finish_output, folder_lock, load_run, read_json,
                           start_output, train_run)
from toolchain.search import (HISTORY_FILE, SearchHistory, SearchResult, infeasible_message, non_dominated,
                              run_search)
from toolchain.search.executors import check_executor, make_executor
from toolchain.search.objectives import feasibility
from toolchain.search.pareto import front_order
from toolchain.ship.export import export_point
from toolchain.ship.export_cache import EXPORTS, export_key, reuse_or_export
from toolchain.ship.manifest import write_manifest
from toolchain.ship.measured import gate_on_device
from toolchain.ship.report import write_report
from toolchain.ship.selection import (RECOVERY_GAIN, Candidate, Selection, bisect_fastest, closest_by_metric,
                                      export_order, fastest_first, front_floor, keep_non_dominated, out_of_reach,
                                      select_and_export,
                                      SENSIBLE_REASON, sensible_floor)
from toolchain.tables import latency_table_for, other_precisions, search_table_for, table_for_run
from toolchain.training import TrainConfig
from toolchain.twins import TwinChooser

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$NASPRUNE_CACHE`` or ``~/.cache/nasprune`` (tables/ and supernets/ live there)."""
    return cache_root()


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def profile_targets(targets: list[str], *, output: str | None, executor: str, ray_address: str | None,
                    **settings) -> list[tuple[str, Path]]:
    """``nasprune profile`` with several targets or on Ray: a latency table per target, one after another here or as
    Ray tasks (``settings``: model, precision, grid and sample sizes, resume, progress). Returns ``(target name,
    written path)`` pairs. One target here: :func:`latency_models.cache.run_profile`."""
    if output and Path(output).suffix.lower() == ".json":
        raise CompileError("with several targets (or --executor ray), --output is a folder: one table per target")
    check_executor(executor, None, ray_address)
    with make_executor(executor, None, ray_address) as ex:
        if ex.name != "local":
            print(f"profiling {', '.join(targets)} on {ex.describe()}", flush=True)
        paths = run_profiles(targets, ex, out_dir=output, **settings)
    return [(load_target(t).name, path) for t, path in zip(targets, paths)]


# ---------------------------------------------------------------------------------------------- stage 2: train
def supernet_for(opts: CompileOptions) -> Run:
    data = DataSettings(**{**asdict(opts.data), "max_train_samples": opts.budget("max_train_samples"),
                           "seed": opts.seed})
    cfg = TrainConfig(strategy=opts.strategy, epochs=opts.budget("epochs"), seed=opts.seed)
    key = {"model": opts.model, "data": data.to_dict(), "space": opts.space, "train": asdict(cfg),
           "reorder": opts.reorder}
    init = opts.resolved_init()
    if init != "pretrained":  # only then: cached super-networks made before the option keep their keys
        key["init"] = init
    folder = cache_dir() / "supernets" / _key(key)
    with folder_lock(folder, "this super-network"):  # two compiles sharing it: one trains, the other waits
        return train_run(folder, model=opts.model, data=data, space=opts.space, train_config=cfg,
                         reorder=opts.reorder, init=init, progress=opts.progress)


def evaluate_subnet(folder: str | Path, subnet: SubNetwork | None, max_samples: int | None = None,
                    batch_size: int = 64) -> dict:
    """``nasprune evaluate``: the task metric of ``subnet`` (default: the full network) with the shared weights of a
    trained run folder, on the validation set (or a seeded subset of ``max_samples``)."""
    run = load_run(folder)
    subnet = subnet or run.supernet.full()
    d = run.supernet.dims
    try:
        subnet.validate_for(d.num_layers, d.num_heads, d.intermediate_size)
    except ValueError as e:
        raise RunError(f"--subnet does not fit the super-network of {folder}: {e}") from None
    enc = run.encoded("validation", max_samples=max_samples)
    metrics = Evaluator(run.supernet, enc, run.spec, batch_size=batch_size)(subnet)
    return {"subnet": subnet.to_dict(), "parameters": run.space.num_parameters(subnet),
            "examples": len(enc["labels"]), **metrics}


# --------------------------------------------------------------------------------------------- stage 3: search
def cost_metrics(table, space, subnet, confidence: float | None = None) -> dict[str, float]:
    """The hardware-side metrics of a candidate: predicted latency and memory on the target, exact parameters; with
    ``confidence``, ``latency_bound`` too, the latency's upper bound the constraint holds for (opts.constraints)."""
    costs = {"latency": table.predict_latency(subnet), "memory": table.predict_memory(subnet),
             "params": float(space.num_parameters(subnet))}
    if confidence is not None:
        costs["latency_bound"] = table.predict_latency(subnet, confidence)
    return costs


def search_stage(run: Run, table, opts: CompileOptions, folder: Path) -> SearchResult:
    space = run.space
    costs = partial(cost_metrics, table, space, confidence=opts.latency_confidence)  # picklable: Ray workers copy it
    if opts.method == "rfp":
        return rfp_stage(run, table, costs, opts, folder)
    objective = SearchObjective(search_evaluator(run, opts), costs)
    with make_executor(opts.executor, opts.workers, opts.ray_address) as executor:
        result = run_search(space, objective, objectives=opts.objectives, constraints=opts.constraints(table),
                            method=opts.method,
                            n_evals=opts.budget("n_evals"), max_seconds=opts.max_search_seconds,
                            pop_size=opts.budget("pop_size"), seed=opts.seed,
                            history_path=folder / HISTORY_FILE,
                            normalizers=cost_metrics(table, space, space.largest()), progress=opts.progress,
                            executor=executor, batch_size=opts.search_batch_size, on_evaluated=objective.remember)
    result.save(folder / "pareto.json")
    return result


def search_evaluator(run: Run, opts: CompileOptions) -> Evaluator:
    """Shared-weight scores on the search's validation subsample, kept in the store beside the super-network."""
    n, dtype = opts.budget("search_eval_samples"), resolve_dtype(opts.search_dtype)
    store = run.evaluation_store("validation", n, opts.seed, dtype)
    return Evaluator(run.supernet, run.encoded("validation", max_samples=n, seed=opts.seed), run.spec, dtype=dtype,
                     param_count=run.space.num_parameters, store=store)


def with_earlier_points(result: SearchResult, evaluator: Evaluator, costs, space) -> list[dict]:
    """``result.pareto`` joined by every point that earlier searches of the same super-network scored on the same
    data (the evaluation store) and that meets this search's constraints, then non-dominated again: a recompile
    under a new budget starts from the best that any search found, not only from what its own search visited."""
    known = {r["key"] for r in result.pareto}
    extra = []
    for subnet, metrics in evaluator.known():
        if subnet.key() in known:
            continue
        try:
            space.encode(subnet)
        except ValueError:  # scored in another search space
            continue
        values = {"error": metrics["error"], **costs(subnet)}
        status = feasibility(values, result.constraints)
        if status["feasible"]:
            extra.append({"index": -1, "key": subnet.key(), "subnet": subnet, **values, **status,
                          "extra": {"from": "evaluation store"}})
    if not extra:
        return list(result.pareto)
    return sorted(non_dominated(list(result.pareto) + extra, result.objectives), key=front_order(result.objectives))


def search_run(folder: str | Path, opts: CompileOptions) -> SearchResult:
    """``nasprune search``: stage 3 over a trained run folder (``pareto.json`` and the history written there)."""
    check_executor(opts.executor, opts.workers, opts.ray_address)  # Ray missing, bad --workers: before any work
    run = load_run(folder)
    opts = opts.for_run(run)
    _, _, _, search = table_for_run(run, opts)
    result = search_stage(run, search, opts, Path(folder))
    if not result.feasible:
        raise InfeasibleError(infeasible_message(result) + confidence_note(opts.latency_confidence, opts.max_latency,
                                                                           search))
    return result


def load_search(folder: Path) -> SearchResult:
    """The search a run folder holds, as :func:`search_stage` returned it: ``pareto.json`` and, for the records,
    ``search_history.csv``."""
    path = folder / "pareto.json"
    saved = read_json(path, f"{path} not found: run `nasprune search {folder}` first",
                      f"run `nasprune search {folder}` again to write it anew")

    def record(r: dict) -> dict:
        return {**r, "subnet": SubNetwork.from_dict(r["subnet"])}

    pareto = [record(r) for r in saved["pareto"]]
    records, history_path = pareto, None
    if (folder / HISTORY_FILE).is_file():
        with SearchHistory(folder / HISTORY_FILE) as history:  # no space: rfp points need not be members
            records, history_path = list(history.rows.values()), history.path
    reference = saved.get("reference_point")
    return SearchResult(
        method=saved["method"], seed=saved["seed"], objectives=tuple(saved["objectives"]),
        constraints=saved.get("constraints") or {}, normalizers=saved.get("normalizers") or {}, records=records,
        pareto=pareto, knee=record(saved["knee"]) if saved.get("knee") else None, hypervolume=saved["hypervolume"],
        wall_time=saved.get("wall_time_s", 0.0), n_new=saved.get("n_new", 0),
        n_from_history=saved.get("n_from_history", 0), eval_seconds=saved.get("eval_time_s", 0.0),
        stop_reason=saved.get("stop_reason", ""), history_path=history_path,
        **({"reference_point": reference[0]} if reference else {}))


# ------------------------------------------------------------------------------------------ stage 4: validate
def validate_front(run: Run, pareto: list[dict], scales_of=lambda subnet: None) -> list[dict]:
    """Pareto records re-evaluated on the full validation set (the subsample's error is kept as ``search_error``).
    ``scales_of(subnet)`` gives a point's rfp scales (``None``: shared weights)."""
    enc = run.encoded("validation")
    full = Evaluator(run.supernet, enc, run.spec, param_count=run.space.num_parameters,
                     store=run.evaluation_store("validation"))
    front = []
    for r in pareto:
        scales = scales_of(r["subnet"])
        ev = full if not scales else Evaluator(point_supernet(run, r["subnet"], scales), enc, run.spec,
                                               param_count=run.space.num_parameters)
        m = ev(r["subnet"])
        front.append({**r, "search_error": r["error"], "error": m["error"], "score": m["score"]})
    return front


# -------------------------------------------------------------------------------------------- stage 5: export
def export_stage(run: Run, table, target: Target, precision: str, front: list[dict], opts: CompileOptions,
                 folder: Path, search_table, scales: dict[str, dict] | None = None) -> tuple[Selection, dict]:
    """Export ``front`` in :func:`~toolchain.ship.selection.export_order`; ``search_table``: what the search placed
    candidates with (:func:`toolchain.tables.search_table_for`), which predicts each precision it has a table of;
    ``scales`` (subnet key -> rfp scales) are folded into the weights. Returns the selection and the unpruned model's
    figures (exported the same way)."""
    scales, tables = scales or {}, search_table.tables
    recover = opts.recover and not scales  # an rfp point keeps its own rescaling, no distillation
    settings = opts.recover_settings()

    # each point is measured beside the unpruned network in its own precision (the reference export in the compile's)
    beside_own = References(precision, tables, target, run.supernet.slice(run.supernet.full()))

    def export_fn(supernet, subnet, *args, extra=None, **kwargs):
        kwargs["reference"] = beside_own(kwargs.get("precision"), kwargs["reference"])
        if not recover:  # an rfp point runs on its own rescaled copy
            return export_point(point_supernet(run, subnet, scales.get(subnet.key())), subnet, *args, extra=extra,
                                **kwargs)
        # the full network too: it is the teacher, but the same training on more of the task's text with labels
        # lifts it as well, and the reference and every candidate are only comparable after the same training
        point = recover_point(run, subnet, settings, progress=opts.progress)
        extra = {**(extra or {}), "recovery": recovery_summary(point)}
        build = partial(export_point, supernet, subnet, *args, extra=extra, sliced_weights=point.model, **kwargs)
        if point.path is None:
            return build()
        # kept beside the recovered weights: a recompile that ships the same point measures its latency again only
        key = export_key(kwargs["precision"], kwargs["target"], kwargs["metric_data"], kwargs["lengths"])
        return reuse_or_export(point.path / EXPORTS, key, args[1], build, point_id=kwargs["point_id"], extra=extra,
                               predicted=kwargs["predicted"], target=kwargs["target"], reference=kwargs["reference"])

    # scored on dev and unused training examples (toolchain.heldout), at the run's max_length whatever the length
    validation = selection_metric(run, settings if recover else None, opts.budget("selection_samples"), opts.seed)
    n = opts.budget("n_export")
    common = dict(precision=precision, target=target, metric_data=validation, lengths=REPORT_LENGTHS)
    # the unpruned model first, exported and measured the same way: the reference for speed-ups and accuracy limits,
    # then measured beside every point (drift correction)
    full = run.supernet.full()
    beside = export_reference(table, target)
    ref = export_fn(run.supernet, full, run.tokenizer, folder / "reference" / "unpruned",
                    predicted={"latency_ms": table.predict_latency(full), "memory_mb": table.predict_memory(full)},
                    point_id="unpruned", overwrite=True, reference=beside, **common)
    common["reference"] = replace(beside, onnx=ref.path / "model.onnx")
    unpruned = {"parameters": ref.parameters, "measured_latency_ms": ref.measured_latency_ms,
                "measured_latency_drift_corrected_ms": ref.measured_latency_drift_corrected_ms,
                "predicted_latency_ms": table.predict_latency(full), "measured_memory_mb": ref.measured_memory_mb,
                "metric": (ref.metric or {}).get("score"),
                "metric_before_recovery": ref.metric_before_recovery, "metric_dev": ref.metric_dev,
                "path": str(ref.path.relative_to(folder))}
    floor, ref_metric, ref_dev = opts.metric_floor(unpruned["metric"]), unpruned["metric"], unpruned["metric_dev"]
    unpruned["metric_floor"] = floor
    unpruned["metric_constant"] = constant = validation.constant_score()  # no limit: ship no useless point
    unpruned["metric_sensible"] = sensible = None if floor is not None else sensible_floor(unpruned["metric"], constant)
    order = export_order(front, n) if floor is None else fastest_first(front, front_floor(floor, ref_metric, ref_dev))
    if not order:  # (under an accuracy limit)
        raise InfeasibleError(f"no sub-network on the front comes within {RECOVERY_GAIN:g} of the accuracy limit "
                              f"{floor:.4f} before recovery; closest: {closest_by_metric(front)}")
    # precision is a decision: without --precision every candidate is tried in every precision of the target (each
    # predicted by its table where the search had one, else judged by what it measures), the unpruned network first;
    # the shipped set is the Pareto set across them (not for a table of another device: only its precision has one)
    others = other_precisions(opts, target, precision)
    score = unpruned["metric"] or 0.0  # recovered with the reference
    first = [dict(subnet=full, latency=unpruned["predicted_latency_ms"], error=1 - score, score=score,
                  search_error=None)] if others and not any(r["subnet"] == full for r in order) else []

    def candidate(r, p):
        t = tables.get(p or precision)
        predicted = {"latency_ms": t.predict_latency(r["subnet"]) if t else None,
                     "memory_mb": t.predict_memory(r["subnet"]) if t else None,
                     "error": r["error"], "metric_shared_weights": r["score"]}
        if t is None:  # no table of this precision (the user's --latency-table is of another): no prediction
            predicted["table_precision"] = precision
        twin = {"uniform_twin": r["uniform_twin"]} if "uniform_twin" in r else {}
        return Candidate(r["subnet"], predicted, {"search_error": r["search_error"], **twin}, precision=p)

    # each point is recovered beside its uniform and Fisher twins, the best exported (toolchain.twins)
    twins = TwinChooser(run, partial(cost_metrics, search_table, run.space, confidence=opts.latency_confidence),
                        opts.constraints(search_table), settings, opts.progress, uniform=opts.uniform_twin, fisher_samples=
                        opts.budget("rfp_samples") if opts.fisher_twin else None) if recover else None

    shipped, unpruned_other = set(), []  # sub-networks shipped in some precision; the unpruned one in others

    done = [0]  # exports shipped so far

    def outcome(c: Candidate, res) -> None:
        if res is not None:
            done[0] += 1
            shipped.add(c.subnet.key())
            if c.subnet == full and c.precision:
                unpruned_other.append(c.precision)

    def picks() -> int:  # sub-networks to export: when the unpruned network ships in another precision, it is the
        return n - 1 if unpruned_other and n > 1 else n  # most accurate of the points a user would pick

    unreachable: list[tuple[Candidate, str]] = []  # not exported: predicted over budget beyond its table's errors

    tried_subnets: set[str] = set()  # sub-networks with at least one precision within reach (exported, or tried)

    def reachable(c: Candidate) -> bool:
        why = out_of_reach(c.predicted["latency_ms"], tables.get(c.precision or precision), opts.max_latency)
        if why is not None:
            log.info("not exporting %s in %s: %s", c.subnet.key(), c.precision or precision, why)
            unreachable.append((c, why))
        else:
            tried_subnets.add(c.subnet.key())
        return why is None

    def cands():  # lazily: the sub-networks to pick are decided once the unpruned network was tried in the others
        yield from (c for r in first for p in others for c in [candidate(r, p)] if reachable(c))
        sub = (bisect_fastest(order, lambda r: chosen(r["subnet"].key()) in shipped) if floor is not None  # accuracy
               else export_order(front, picks(), most_accurate=not unpruned_other))  # limit: bisect for the fastest
        for r in sub:
            if done[0] >= slots():  # the precisions left out took their slots with them: no fall-back to recover
                return
            t = twins(r) if twins else r
            yield from (c for p in [None] + others for c in [candidate(t, p)] if reachable(c))

    def chosen(key: str) -> str:  # the sub-network tried in place of a front point (its uniform twin, or itself)
        return twins.chosen.get(key, key) if twins else key

    def slots() -> int:  # measured-feasible exports before the Pareto cut: every precision of each sub-network but
        # those out of reach where another precision of it is not (they draw no fall-back in: the sub-network is
        # tried), and the unpruned network's where it ships in another
        each = picks() * (1 + len(others)) + len(unpruned_other) if first else n * (1 + len(others))
        return each - sum(1 for c, _ in unreachable if c.subnet != full and c.subnet.key() in tried_subnets)

    with beside_own:
        selection = select_and_export(cands(), slots, opts.max_latency, max_memory_mb=opts.max_memory,
                                      min_metric=floor if floor is not None else sensible, min_metric_reason=
                                      "the accuracy limit" if floor is not None else SENSIBLE_REASON.format(constant),
                                      model_or_supernet=run.supernet, tokenizer=run.tokenizer,
                                      run_dir=folder, export_fn=export_fn, on_outcome=outcome, **common)
    selection.not_exported = unreachable
    if others:
        selection = keep_non_dominated(selection, n, folder)
    if floor is not None and not selection.shipped:
        tried = sorted(selection.rejected, key=lambda rw: -((rw[0].metric or {}).get("score") or 0))
        closest = "; ".join(f"{r.point_id}: metric {(r.metric or {}).get('score', float('nan')):.4f}, "
                            f"{r.measured_latency_ms or 0:.2f} ms" for r, _ in tried[:3])
        ref_metric = f"{unpruned['metric']:.4f}" if unpruned["metric"] is not None else "unknown"
        raise InfeasibleError(f"no exported point reaches the accuracy limit {floor:.4f} (the unpruned model: "
                              f"{ref_metric}); closest: {closest or 'none exported'}")
    return selection, unpruned


# ---------------------------------------------------------------------------------- stages 4-6: ship a search
def ship_run(run: Run, table, target: Target, precision: str, result: SearchResult, opts: CompileOptions,
             folder: Path, search_table, settings: dict, timings: dict[str, float], started: float) -> Selection:
    """Stages 4-6 over the search ``result`` of ``folder``: validate its Pareto points on the full validation set,
    export and ship them, write ``pareto.png``, ``report.html`` and ``manifest.json`` (``settings``, ``timings``
    with ``validate_s``, ``export_s`` and ``total_s`` since ``started`` added). ``search_table``: what the search
    placed candidates with (:func:`toolchain.tables.search_table_for`)."""
    t = time.time()
    scales = rfp_scales(folder)  # points of a --method rfp search carry their own rescaling
    pareto = result.pareto if scales else with_earlier_points(
        result, search_evaluator(run, opts), partial(cost_metrics, search_table, run.space), run.space)
    front = validate_front(run, pareto, lambda subnet: scales.get(subnet.key()))
    timings["validate_s"] = round(time.time() - t, 1)

    # best validation metric first; points measured over budget are not shipped
    t = time.time()
    selection, unpruned = export_stage(run, table, target, precision, front, opts, folder, search_table, scales)
    timings["export_s"] = round(time.time() - t, 1)

    timings["total_s"] = round(time.time() - started, 1)
    write_report(folder, result, front, selection, unpruned, settings, timings, metric_name=run.spec.metric,
                 full=run.supernet.full())
    write_manifest(folder, {**settings, "unpruned": unpruned}, timings,
                   {"value": result.hypervolume, "normalizers": result.normalizers,
                    "reference_point": result.reference_point, "objectives": list(result.objectives)}, selection)
    return selection


def export_run(folder: str | Path, opts: CompileOptions) -> Selection:
    """``nasprune export``: stages 4-6 (:func:`ship_run`) over a run folder that holds a search, writing the same
    artifacts as a compile (``points/``, ``manifest.json``, ``pareto.png``, ``report.html``). With
    ``opts.measured`` (figures measured on the device, :mod:`toolchain.ship.measured`) the exported points are gated
    on those instead, and nothing is exported again."""
    started = time.time()
    folder = Path(folder)
    if opts.measured:
        return gate_on_device(folder, opts.measured, opts.max_latency, opts.max_memory)
    run = load_run(folder)
    result = load_search(folder)
    opts = replace(opts.for_run(run), method=result.method, objectives=tuple(result.objectives))
    t = time.time()
    target, precision, table, search = table_for_run(run, opts)
    timings = {"profile_s": round(time.time() - t, 1)}
    target.check_available()  # export measures on the target: e.g. cuda needs a GPU here
    return ship_run(run, table, target, precision, result, opts, folder, search,
                    run_settings(opts, run, table, target, precision, search), timings, started)


# ----------------------------------------------------------------------------------------------- every stage
def run_settings(opts: CompileOptions, run: Run, table, target: Target, precision: str, search_table) -> dict:
    """The settings a run records (``run.json``, ``manifest.json``, ``report.html``); ``search_table``: what the
    search placed candidates with (:func:`toolchain.tables.search_table_for`)."""
    supernet = Path(run.settings["supernet_dir"]).parent if "supernet_dir" in run.settings else run.folder
    return {
        "model": opts.model or "all-MiniLM-L6-v2", "task": opts.data.name, "data": opts.data.describe(),
        "target": target.name,
        "precision": precision, "batch_size": target.batch_size, "sequence_length": target.sequence_length,
        "max_latency_ms": opts.max_latency, "max_memory_mb": opts.max_memory, "max_params": opts.max_params,
        "objectives": list(opts.objectives), "space": opts.space, "strategy": opts.strategy,
        "init": opts.resolved_init(), "method": opts.method, "preset": opts.preset, "n_evals": opts.budget("n_evals"),
        "search_eval_samples": opts.budget("search_eval_samples"),
        "seed": opts.seed, "supernet": str(supernet), "latency_table": str(table.path),
        "sequence_length_from": opts.sequence_length_choice()[1], "latency_confidence": opts.latency_confidence,
        "latency_bound": search_table.latency_bound(opts.latency_confidence) if opts.latency_confidence else None,
        "search_latency": search_table.describe(),  # the precision(s) it placed them in
        "search_latency_tables": search_table.paths(),
        "measured_on_target": target.is_this_machine,  # False: the table is another device's (device_target)
    }


def compile_model(opts: CompileOptions) -> dict:
    """Run every stage; returns the manifest (also written to ``<output>/manifest.json``)."""
    t_start = time.time()
    timings: dict[str, float] = {}
    target, precision = opts.check()  # task, data, model, lengths, target, executor: before any folder exists
    out = Path(opts.output) if opts.output else opts.default_output()
    partial = check_output(out, opts.resume, opts.overwrite)  # made once the super-network and the table are there

    # stage 2 first needs the model dims for the table; both are cached
    t = time.time()
    run = supernet_for(opts)
    timings["train_s"] = round(time.time() - t, 1)

    t = time.time()
    table = latency_table_for(opts, target, precision, run.supernet.dims, run.supernet.config)
    target = table.device_target(target, precision)  # another device's table: ship on its predictions
    search = search_table_for(opts, target, precision, table, run.supernet.dims, run.supernet.config)
    timings["profile_s"] = round(time.time() - t, 1)

    settings = run_settings(opts, run, table, target, precision, search)
    start_output(partial, opts.resume)
    write_json_atomic(partial / "run.json", {**run.settings, "supernet_dir": str(run.folder / "supernet"),
                                             "compile": settings})

    t = time.time()
    result = search_stage(run, search, opts, partial)
    timings["search_s"] = round(time.time() - t, 1)
    if not result.feasible:
        raise InfeasibleError(infeasible_message(result) + confidence_note(opts.latency_confidence, opts.max_latency,
                                                                           search))

    ship_run(run, table, target, precision, result, opts, partial, search, settings, timings, t_start)
    finish_output(partial, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["output"] = str(out)
    return manifest
