"""``nasprune-compile``: pre-trained model + task + target + budget -> shipped, verified ONNX sub-networks.

Stages (each cached or resumable):

1. latency table of the target (cached per target fingerprint and model dimensions; ``--latency-table`` to bring one)
2. super-network training (cached per model, data, space, strategy, seed and training budget)
3. search (NSGA-II by default) with ``search_history.csv`` in the run folder (resumable)
4. Pareto points re-evaluated on the full validation set
5. export: slice -> ONNX -> fuse (-> int8) -> verify -> measure; a point over budget when *measured* is not shipped
6. report: ``manifest.json``, ``pareto.png``, ``report.html``

The run is built in ``<output>.partial`` and renamed to ``<output>`` when complete, so a folder named like the output
is always a finished run. ``--resume`` continues a ``.partial`` folder; an existing output needs ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolchain.run import DataSettings, RunError, default_init, load_run, train_run
from toolchain.training import TrainConfig

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    # budgets sized for a 2-core CPU: quick ~5 min, default ~20 min (first run, profiling included)
    "quick": dict(max_train_samples=1500, epochs=1.0, n_evals=60, pop_size=12, search_eval_samples=200, n_export=2,
                  unit_step=384, calibration_samples=8, validation_samples=8, rfp_samples=256),
    "default": dict(max_train_samples=6000, epochs=1.0, n_evals=200, pop_size=20, search_eval_samples=400, n_export=3,
                    unit_step=128, calibration_samples=16, validation_samples=16, rfp_samples=512),
    "paper": dict(max_train_samples=None, epochs=5.0, n_evals=1000, pop_size=50, search_eval_samples=None, n_export=5,
                  unit_step=64, calibration_samples=30, validation_samples=30, rfp_samples=2048),
}


class CompileError(RuntimeError):
    pass


class InfeasibleError(CompileError):
    """No evaluated sub-network meets the constraints (the message shows the closest ones)."""


def cache_dir() -> Path:
    """``$NASPRUNE_CACHE`` or ``~/.cache/nasprune`` (tables/ and supernets/ live there)."""
    from latency_models.cache import cache_dir as tables_dir

    return tables_dir().parent


@dataclass
class CompileOptions:
    model: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    target: str = "cpu"
    latency_table: str | None = None
    precision: str | None = None
    max_latency: float | None = None  # ms
    max_memory: float | None = None  # MB
    max_params: float | None = None
    objectives: tuple[str, ...] = ("error", "latency")
    space: str = "medium"
    strategy: str = "kd"
    method: str = "nsga2"
    preset: str = "default"
    n_evals: int | None = None
    max_search_seconds: float | None = None
    search_eval_samples: int | None = None
    n_export: int | None = None
    max_train_samples: int | None = None
    epochs: float | None = None
    rfp_samples: int | None = None  # --method rfp: training examples for the mask gradients and the rescaling
    reorder: bool = True
    init: str | None = None  # where the super-network starts (run.train_run); None: run.default_init(strategy)
    output: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    executor: str = "local"  # where search candidates are evaluated: local | ray (docs/scaling.md)
    workers: int | None = None  # Ray workers (default: the cluster's CPUs)
    ray_address: str | None = None  # an existing Ray cluster (default: a local instance)
    search_batch_size: int | None = None  # random / local search: candidates per batch

    def budget(self, key: str):
        """An explicit option wins over the preset."""
        if self.preset not in PRESETS:
            raise CompileError(f"unknown preset '{self.preset}'; choose one of: {', '.join(PRESETS)}")
        value = getattr(self, key, None)
        return PRESETS[self.preset][key] if value is None else value

    def resolved_init(self) -> str:
        """Where the super-network starts: ``init``, else :func:`toolchain.run.default_init` of the strategy."""
        return self.init or default_init(self.strategy)

    def default_output(self) -> Path:
        task = "custom" if self.data.train_file else self.data.task
        target = Path(self.target).stem
        budget = f"-{self.max_latency:g}ms" if self.max_latency else ""
        return Path("nasprune-out") / f"{task}-{target}{budget}"


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ stage 1: table
def latency_table_for(opts: CompileOptions, target, precision: str, dims, model_config):
    """The target's latency table: the user's file, the cached one for this fingerprint, or a new profile."""
    from latency_models.cache import default_table_path, run_profile
    from latency_models.lookup_table import LatencyTable

    if opts.latency_table:
        path = Path(opts.latency_table)
        if not path.is_file():
            raise CompileError(f"latency table not found: {path}")
        table = LatencyTable.load(path)
    else:
        path = default_table_path(target, precision, dims)
        if path.is_file():
            log.info("using cached latency table %s", path)
            table = LatencyTable.load(path)
        else:
            log.info("profiling %s (%s) for this model family; cached in %s", target.name, precision, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = LatencyTable.load(run_profile(
                target=opts.target, model=opts.model, precision=precision, out=str(path), bundle=None,
                unit_step=opts.budget("unit_step"), calibrate_samples=opts.budget("calibration_samples"),
                validate_samples=opts.budget("validation_samples"), resume=True, progress=opts.progress))
    table.check_model(dims)
    table.check_fingerprint(target, precision)  # warns on another machine / runtime
    return table


# ---------------------------------------------------------------------------------------------- stage 2: train
def supernet_for(opts: CompileOptions):
    data = DataSettings(**{**asdict(opts.data), "max_train_samples": opts.budget("max_train_samples"),
                           "seed": opts.seed})
    cfg = TrainConfig(strategy=opts.strategy, epochs=opts.budget("epochs"), seed=opts.seed)
    key = {"model": opts.model, "data": data.to_dict(), "space": opts.space, "train": asdict(cfg),
           "reorder": opts.reorder}
    init = opts.resolved_init()
    if init != "pretrained":  # only then: cached super-networks made before the option keep their keys
        key["init"] = init
    folder = cache_dir() / "supernets" / _key(key)
    return train_run(folder, model=opts.model, data=data, space=opts.space, train_config=cfg, reorder=opts.reorder,
                     init=init, progress=opts.progress)


# --------------------------------------------------------------------------------------------------- pipeline
def compile_model(opts: CompileOptions) -> dict:
    """Run every stage; returns the manifest (also written to ``<output>/manifest.json``)."""
    from targets import load_target

    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(opts.output) if opts.output else opts.default_output()
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        if not opts.overwrite:
            raise CompileError(f"{out} already holds a finished run; pass --overwrite to replace it, or --output")
    if partial.exists() and not opts.resume:
        if not opts.overwrite:
            raise CompileError(f"{partial} holds an unfinished run; pass --resume to continue it, "
                               "or --overwrite to start again")
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)

    target = load_target(opts.target)
    precision = target.check_precision(opts.precision)
    target.check_available()  # e.g. --target cuda without a GPU: fail before any long work
    from toolchain.search.executors import check_executor

    check_executor(opts.executor, opts.workers)
    opts.data.spec()  # unknown task, missing data files: fail before any long work
    opts.data.load("validation")
    opts.data.load("train")

    # stage 2 first needs the model dims for the table; both are cached
    t = time.time()
    run = supernet_for(opts)
    timings["train_s"] = round(time.time() - t, 1)
    dims = run.supernet.dims

    t = time.time()
    table = latency_table_for(opts, target, precision, dims, run.supernet.config)
    timings["profile_s"] = round(time.time() - t, 1)

    settings = {
        "model": opts.model or "all-MiniLM-L6-v2", "task": opts.data.task, "target": target.name,
        "precision": precision, "batch_size": target.batch_size, "sequence_length": target.sequence_length,
        "max_latency_ms": opts.max_latency, "max_memory_mb": opts.max_memory, "max_params": opts.max_params,
        "objectives": list(opts.objectives), "space": opts.space, "strategy": opts.strategy,
        "init": opts.resolved_init(), "method": opts.method, "preset": opts.preset, "n_evals": opts.budget("n_evals"),
        "search_eval_samples": opts.budget("search_eval_samples"),
        "seed": opts.seed, "supernet": str(run.folder), "latency_table": str(table.path),
    }
    (partial / "run.json").write_text(json.dumps({**run.settings, "supernet_dir": str(run.folder / "supernet"),
                                                  "compile": settings}, indent=2) + "\n")

    # stage 3: search
    t = time.time()
    result = search_stage(run, table, opts, partial)
    timings["search_s"] = round(time.time() - t, 1)
    from toolchain.search import infeasible_message

    if not result.feasible:
        raise InfeasibleError(infeasible_message(result))

    # stage 4: full validation of the Pareto points
    t = time.time()
    scales = rfp_scales(partial)
    front = validate_front(run, result.pareto, lambda subnet: scales.get(subnet.key()))
    timings["validate_s"] = round(time.time() - t, 1)

    # stage 5: export, best validation metric first; points measured over budget are not shipped
    t = time.time()
    shipped, selection, unpruned = export_stage(run, table, target, precision, front, opts, partial, scales)
    timings["export_s"] = round(time.time() - t, 1)

    # stage 6: report + manifest
    timings["total_s"] = round(time.time() - t_start, 1)
    from toolchain.ship.export import write_manifest

    write_report(partial, run, result, front, selection, unpruned, settings, timings)
    write_manifest(partial, {**settings, "unpruned": unpruned}, timings,
                   {"value": result.hypervolume, "normalizers": result.normalizers,
                    "reference_point": result.reference_point, "objectives": list(result.objectives)}, selection)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["output"] = str(out)
    return manifest


def cost_metrics(table, space, subnet) -> dict[str, float]:
    """The hardware-side metrics of a candidate: predicted latency and memory on the target, exact parameters."""
    return {"latency": table.predict_latency(subnet), "memory": table.predict_memory(subnet),
            "params": float(space.num_parameters(subnet))}


def _constraints(opts: CompileOptions) -> dict[str, float]:
    return {k: v for k, v in (("latency", opts.max_latency), ("memory", opts.max_memory),
                              ("params", opts.max_params)) if v is not None}


def search_stage(run, table, opts: CompileOptions, folder: Path):
    if opts.method == "rfp":
        return rfp_stage(run, table, opts, folder)
    from functools import partial

    from toolchain.evaluation import Evaluator, SearchObjective
    from toolchain.search.executors import make_executor
    from toolchain.search import run_search

    n = opts.budget("search_eval_samples")
    ev = Evaluator(run.supernet, run.encoded("validation", max_samples=n, seed=opts.seed), run.spec,
                   param_count=run.space.num_parameters, store=run.evaluation_store("validation", n, opts.seed))
    space = run.space
    objective = SearchObjective(ev, partial(cost_metrics, table, space))  # picklable: Ray workers get a copy

    with make_executor(opts.executor, opts.workers, opts.ray_address) as executor:
        result = run_search(space, objective, objectives=opts.objectives, constraints=_constraints(opts),
                            method=opts.method,
                            n_evals=opts.budget("n_evals"), max_seconds=opts.max_search_seconds,
                            pop_size=opts.budget("pop_size"), seed=opts.seed,
                            history_path=folder / "search_history.csv",
                            normalizers=cost_metrics(table, space, space.largest()), progress=opts.progress,
                            executor=executor, batch_size=opts.search_batch_size, on_evaluated=objective.remember)
    result.save(folder / "pareto.json")
    return result


# ---------------------------------------------------------------------- stage 3 (--method rfp): Kwon et al. 2022
RFP_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25)


def rfp_budgets(table, dims, max_latency: float | None) -> list[float]:
    """Latency budgets (ms) for the retraining-free method: ``RFP_FRACTIONS`` of the unpruned network's predicted
    latency (a front), plus ``max_latency``; budgets below the empty network's latency are left out."""
    from toolchain.core.subnetwork import SubNetwork

    n = dims.num_layers
    full = table.predict_latency(SubNetwork.full(n, dims.num_heads, dims.intermediate_size))
    floor = table.predict_latency(SubNetwork((0,) * n, (0,) * n))
    budgets = {round(f * full, 4) for f in RFP_FRACTIONS}
    if max_latency is not None:
        budgets.add(float(max_latency))
    return sorted((b for b in budgets if b >= floor), reverse=True)


def rfp_stage(run, table, opts: CompileOptions, folder: Path):
    """Retraining-free pruning (``--method rfp``) of the fine-tuned model, one mask per latency budget; each point is
    scored on the same validation subsample as a search and recorded in ``search_history.csv``; the scales of each
    point go to ``rfp.json`` (export folds them into the weights)."""
    from toolchain.evaluation import Evaluator
    from toolchain.rfp import prune
    from toolchain.search import Evaluations, SearchError, SearchHistory, SearchResult, summarize
    from toolchain.core.subnetwork import SubNetwork

    t0 = time.perf_counter()
    space = run.space
    n = opts.budget("search_eval_samples")
    enc = run.encoded("validation", max_samples=n, seed=opts.seed)
    path = folder / "rfp.json"
    saved = _load_rfp(path)
    budgets = rfp_budgets(table, run.supernet.dims, opts.max_latency)
    if not budgets:
        raise SearchError("no latency budget is reachable: even the network without encoder layers is predicted "
                          f"at {table.predict_latency(space.smallest()):.2f} ms")
    todo = [b for b in budgets if str(b) not in saved]
    if todo:
        train = run.encoded("train", max_samples=opts.budget("rfp_samples"), seed=opts.seed)
        for r in prune(run.supernet.model, train, run.spec, todo, table, n_samples=opts.budget("rfp_samples"),
                       seed=opts.seed, progress=opts.progress):
            saved[str(r.budget)] = r.to_dict()
            path.write_text(json.dumps(saved) + "\n")

    by_key = _rfp_by_key(saved, path)

    def evaluate(subnet):
        entry = by_key[subnet.key()]
        ev = Evaluator(point_supernet(run, subnet, entry.get("scales")), enc, run.spec,
                       param_count=space.num_parameters)
        return {"error": ev(subnet)["error"], **cost_metrics(table, space, subnet),
                "budget_ms": float(entry["budget"])}

    constraints = _constraints(opts)
    normalizers = cost_metrics(table, space, space.largest())
    with SearchHistory(folder / "search_history.csv", space) as history:
        evaluations = Evaluations(evaluate, objectives=opts.objectives, constraints=constraints, history=history)
        for b in budgets:
            evaluations(SubNetwork.from_dict(saved[str(b)]["subnetwork"]))
    records = evaluations.visited
    pareto, knee, hv = summarize(records, opts.objectives, normalizers)
    result = SearchResult(method="rfp", seed=opts.seed, objectives=tuple(opts.objectives), constraints=constraints,
                          normalizers=normalizers, records=records, pareto=pareto, knee=knee, hypervolume=hv,
                          wall_time=time.perf_counter() - t0, n_new=evaluations.n_new,
                          n_from_history=len(records) - evaluations.n_new, eval_seconds=evaluations.eval_seconds,
                          stop_reason=f"{len(budgets)} latency budgets", history_path=history.path)
    result.save(folder / "pareto.json")
    return result


def _load_rfp(path: Path) -> dict[str, dict]:
    """``rfp.json``: budget -> point (sub-network, scales, ...); empty when there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CompileError(f"{path} is damaged ({e}); delete it to recompute the rfp points") from e


def _rfp_by_key(saved: dict[str, dict], path: Path) -> dict[str, dict]:
    """The points of an ``rfp.json`` by sub-network key."""
    from toolchain.core.subnetwork import SubNetwork

    try:
        return {SubNetwork.from_dict(v["subnetwork"]).key(): v for v in saved.values()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompileError(f"{path} is damaged ({e}); delete it to recompute the rfp points") from e


def rfp_scales(folder: Path) -> dict[str, dict]:
    """Sub-network key -> rfp scales, from ``<folder>/rfp.json`` (empty for a run that did not use ``--method rfp``)."""
    path = Path(folder) / "rfp.json"
    try:
        return {key: v["scales"] for key, v in _rfp_by_key(_load_rfp(path), path).items()}
    except KeyError as e:
        raise CompileError(f"{path} is damaged ({e}); delete it to recompute the rfp points") from e


def point_supernet(run, subnet, scales: dict | None):
    """The network a point runs on: the shared weights, or (rfp) a copy with the point's scales folded in."""
    if not scales:
        return run.supernet
    from toolchain.rfp import Scales, fold_scales
    from toolchain.core.supernet import SuperNetwork

    return SuperNetwork(fold_scales(run.supernet.model, subnet, Scales.from_dict(scales)))


def validate_front(run, pareto: list[dict], scales_of=lambda subnet: None) -> list[dict]:
    """Pareto records re-evaluated on the full validation set (the subsample's error is kept as ``search_error``).
    ``scales_of(subnet)`` gives a point's rfp scales (``None``: shared weights)."""
    from toolchain.evaluation import Evaluator

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


def export_order(front: list[dict], n: int) -> list[dict]:
    """Candidates in shipping order: the best metric first, then points spread along the front (cheaper ones)."""
    if not front:
        return []
    by_metric = sorted(front, key=lambda r: r["error"])
    order = [by_metric[0]]
    rest = sorted((r for r in front if r is not by_metric[0]), key=lambda r: r.get("latency", 0), reverse=True)
    if rest and n > 1:  # evenly spaced over the remaining front, then everything else as fall-backs
        step = max(1, len(rest) // (n - 1))
        spread = rest[step - 1::step][: n - 1] or rest[: n - 1]
        order += spread + [r for r in rest if r not in spread]
    return order + [r for r in by_metric[1:] if r not in order]


def export_stage(run, table, target, precision, front, opts: CompileOptions, folder: Path,
                 scales: dict[str, dict] | None = None):
    """Export ``front`` in :func:`export_order`; ``scales`` (subnet key -> rfp scales) are folded into the weights."""
    from toolchain.ship.export import Candidate, export_point, select_and_export

    scales = scales or {}

    def export_fn(supernet, subnet, *args, **kwargs):  # an rfp point runs on its own rescaled copy
        return export_point(point_supernet(run, subnet, scales.get(subnet.key())), subnet, *args, **kwargs)

    validation = run.data.load("validation")
    n = opts.budget("n_export")
    cands = [Candidate(r["subnet"], {"latency_ms": r.get("latency", table.predict_latency(r["subnet"])),
                                     "memory_mb": r.get("memory", table.predict_memory(r["subnet"])),
                                     "error": r["error"], "metric_shared_weights": r["score"]},
                       {"search_error": r["search_error"]})
             for r in export_order(front, n)]
    common = dict(precision=precision, target=target, metric_data=validation)
    selection = select_and_export(cands, n, opts.max_latency, max_memory_mb=opts.max_memory,
                                  model_or_supernet=run.supernet, tokenizer=run.tokenizer, run_dir=folder,
                                  export_fn=export_fn, **common)
    # the unpruned model, exported and measured the same way (reference for speed-ups)
    full = run.supernet.full()
    ref = export_point(run.supernet, full, run.tokenizer, folder / "reference" / "unpruned",
                       predicted={"latency_ms": table.predict_latency(full), "memory_mb": table.predict_memory(full)},
                       point_id="unpruned", overwrite=True, **common)
    unpruned = {"parameters": ref.parameters, "measured_latency_ms": ref.measured_latency_ms,
                "predicted_latency_ms": table.predict_latency(full), "measured_memory_mb": ref.measured_memory_mb,
                "metric": (ref.metric or {}).get("score"), "path": str(ref.path.relative_to(folder))}
    return selection.shipped, selection, unpruned


def write_report(folder: Path, run, result, front, selection, unpruned, settings, timings) -> None:
    from toolchain.ship.report import html_report, pareto_plot

    x_axis = next((o for o in result.objectives if o != "error"), "latency")
    budget = {"latency": settings["max_latency_ms"], "memory": settings["max_memory_mb"],
              "params": settings["max_params"]}.get(x_axis)
    metric_name = run.spec.metric
    records = result.records
    shipped_rows, shipped_pts = [], []
    for res in selection.shipped:
        info = res.info
        lat = res.measured_latency_ms
        score = (res.metric or {}).get("score")
        pred = (info.get("predicted") or {})
        shipped_pts.append({x_axis: pred.get("latency_ms") if x_axis == "latency" else
                            (pred.get("memory_mb") if x_axis == "memory" else res.parameters),
                            "error": pred.get("error", 1 - (score or 0)),
                            "label": f"{res.point_id[:2]}: {lat:.1f} ms measured" if lat else res.point_id[:2]})
        shipped_rows.append(_row(res, folder))
    rejected_rows = [_row(r, folder) for r, _ in selection.rejected]
    full = run.supernet.full()
    unpruned_pt = next((r for r in records if r["subnet"] == full), None)
    if unpruned_pt is None and unpruned.get("metric") is not None:  # not among the candidates: its export's figures
        unpruned_pt = {"latency": unpruned["predicted_latency_ms"], "memory": None, "params": unpruned["parameters"],
                       "error": 1 - unpruned["metric"]}
        if x_axis == "memory":
            unpruned_pt = None if unpruned.get("measured_memory_mb") is None else \
                {**unpruned_pt, "memory": unpruned["measured_memory_mb"]}
    png = pareto_plot(folder / "pareto.png", records, front, x_axis=x_axis, metric_name=metric_name, budget=budget,
                      unpruned=unpruned_pt, shipped=shipped_pts,
                      title=f"{settings['task']} on {settings['target']} ({settings['precision']}): "
                            f"{len(records)} sub-networks evaluated, {len(front)} on the front")
    notes = [
        f"Search: {result.method}, {len(records)} candidates, hypervolume {result.hypervolume:.4f} "
        f"(normalised by the unpruned network; reference point {result.reference_point}).",
        f"Accuracy on the plot: validation subsample during search; shipped points: full validation set "
        f"measured on the exported ONNX model.",
        f"Unpruned model: {unpruned['parameters'] / 1e6:.2f}M parameters, {unpruned['measured_latency_ms']:.2f} ms "
        f"measured, metric {unpruned['metric']}.",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
    ]
    html_report(folder / "report.html", title=f"nasprune report: {settings['task']} on {settings['target']}",
                png=png, settings=settings, shipped_rows=shipped_rows, rejected_rows=rejected_rows, notes=notes)


def _row(res, folder: Path) -> dict:
    pred = (res.info.get("predicted") or {}).get("latency_ms")
    score = (res.metric or {}).get("score")
    return {"point": res.point_id, "parameters": f"{res.parameters / 1e6:.2f}M",
            "predicted latency (ms)": f"{pred:.2f}" if pred is not None else "",
            "measured latency (ms)": f"{res.measured_latency_ms:.2f}" if res.measured_latency_ms else "",
            "memory (MB)": f"{res.measured_memory_mb:.1f}" if res.measured_memory_mb else "",
            "metric": f"{score:.4f}" if score is not None else "",
            "path": str(Path(res.path).resolve().relative_to(folder.resolve())) if folder in Path(res.path).parents
            else str(res.path)}
