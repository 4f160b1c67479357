"""nasprune's NAS against what a user would pick instead, on five GLUE tasks, on one latency axis (this CPU).

    python benchmarks/bench_baselines.py                      # everything; rewrites the bench_baselines section
    python benchmarks/bench_baselines.py --tasks rte --quick  # a smoke run
    python benchmarks/bench_baselines.py --report-only        # rebuild tables and plots from saved results

Methods (docs/benchmarks.md says the same):

- ``unpruned``: the model fine-tuned the standard way (``--strategy standard``), fp32 and dynamic int8 ONNX.
- ``layer-drop``: the first k pre-trained layers, fine-tuned the same way (k = 1..L-1).
- ``uniform``: the same fraction of heads and FFN units in every layer (0.9 ... 0.1), on the super-network's weights:
  the fixed-ratio choice of architecture, with everything else equal to NAS.
- ``rfp``: Kwon et al.'s retraining-free pruning of the standard fine-tuned model (``--method rfp``).
- ``nas``: nasprune: the weight-sharing super-network + NSGA-II on the latency table (``--method nsga2``). By default
  the super-network starts from the standard fine-tuned model and trains with in-place distillation
  (``nasprune-compile``'s defaults, ``--init finetuned --strategy kd``); ``--init pretrained --strategy sandwich`` is
  the paper's setting. With ``--init finetuned`` the standard model above is the one the super-network started
  from, trained once, and its training time counts for NAS and uniform too.

Data: the dev set of each task is the test set. The search scores candidates on a held-out part of the training
data (``DataSettings.holdout``, seeded), and both the search and the choice of a point under a budget use that
held-out score; nothing is chosen on dev. Latency: the calibrated latency table of this CPU (fp32, batch 1,
sequence 128, the target's threads) for every point, and the ONNX model of every point chosen under a budget
measured end to end on the same target. Budgets: 75/50/33 % of the unpruned model's latency.

On one task (``--extras-task``, SST-2) also: the four search spaces on the same super-network, and weight-sharing
NAS against standard NAS (each candidate fine-tuned on its own) over the same candidates.

Every step's result is saved under ``--out`` as it is computed; an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_dir, machine, table_path, write_section  # noqa: E402


def front(points, objectives=("error", "latency")):
    """The non-dominated points, cheapest first."""
    from toolchain.search import non_dominated

    return sorted(non_dominated(points, objectives), key=lambda p: tuple(p[o] for o in reversed(objectives)))

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
BUDGETS = (0.75, 0.50, 0.33)
METHODS = ("nas", "rfp", "uniform", "layer-drop")
LABELS = {"nas": "NAS (nasprune)", "rfp": "retraining-free (Kwon et al.)", "uniform": "uniform ratio",
          "layer-drop": "layer dropping", "unpruned": "unpruned fp32", "unpruned-int8": "unpruned int8"}
RFP_EXTRA = (0.9, 0.25)  # rfp masks beyond the three budgets, for its front (each costs a rescaling pass)
UNIFORM_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
IMAGES = ROOT / "docs" / "images"
log = logging.getLogger("bench_baselines")


class Saved:
    """A JSON file of finished steps: ``get(name)`` or compute, ``put`` writes at once (atomic)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name):
        return self.data.get(name)

    def put(self, name, value):
        self.data[name] = value
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(path)
        return value


# ------------------------------------------------------------------------------------------------ one task
def _point(subnet, latency_ms, params, dev: dict, **extra) -> dict:
    return {"subnet": subnet.to_dict(), "key": subnet.key(), "latency": float(latency_ms), "params": int(params),
            "error": float(dev["error"]), "score": float(dev["score"]), **extra}


def supernet_name(args) -> str:
    """The folder (under the task's) of the weight-sharing super-network NAS and the uniform ratio use."""
    return f"supernet-{args.strategy}" + ("-finetuned" if args.init == "finetuned" else "")


def standard_folder(folder: Path, args) -> Path:
    """The standard fine-tuned model (unpruned, rfp): with ``--init finetuned`` the one the super-network started
    from, trained once."""
    return folder / supernet_name(args) / "finetuned" if args.init == "finetuned" else folder / "standard"


def run_task(task: str, args, table, saved: Saved) -> dict:
    from toolchain.core.subnetwork import layer_drop_subnet, uniform_subnet
    from toolchain.rfp_stage import point_supernet
    from toolchain.evaluation import Evaluator
    from toolchain.rfp import prune
    from toolchain.run import DataSettings, train_run
    from toolchain.search import run_search
    from toolchain.training import TrainConfig

    folder = Path(args.out) / task
    data = DataSettings(task=task, data_dir=args.data_dir, holdout=args.holdout,
                        max_train_samples=args.train_examples, seed=0)
    n_train = len(data.load("train"))
    epochs = round(min(args.max_epochs, max(1.0, args.train_examples / n_train)), 2)
    progress = not args.no_progress

    def trained(path, strategy, reorder, init="pretrained"):
        cfg = TrainConfig(strategy=strategy, epochs=epochs, batch_size=args.batch_size, seed=0)
        return train_run(path, data=data, space="medium", train_config=cfg, reorder=reorder, init=init,
                         progress=progress)

    # --init finetuned: the super-network starts from the standard fine-tuned model, so NAS's time includes it
    ws = trained(folder / supernet_name(args), args.strategy, True, init=args.init)
    std = trained(standard_folder(folder, args), "standard", False)
    spec, space, dims = ws.spec, ws.space, ws.supernet.dims
    full = space.largest()
    unpruned_ms = table.predict_latency(full)
    dev = ws.encoded("validation", max_samples=args.dev_samples, seed=0)
    ev_ws = Evaluator(ws.supernet, dev, spec, param_count=space.num_parameters,
                      store=ws.evaluation_store("validation", args.dev_samples, 0))
    ev_std = Evaluator(std.supernet, dev, spec, param_count=space.num_parameters,
                       store=std.evaluation_store("validation", args.dev_samples, 0))
    n_holdout = len(data.load("holdout"))
    info = {"task": task, "metric": spec.metric, "train_examples": n_train, "epochs": epochs,
            "holdout_examples": n_holdout, "search_examples": min(args.search_samples, n_holdout),
            "dev_examples": len(ev_ws), "unpruned_ms": unpruned_ms,
            "init": args.init, "train_s": {"standard": std.settings["train_stats"]["seconds"],
                                           "supernet": ws.settings["train_stats"]["seconds"]}}
    # what the super-network cost from the pre-trained model (with --init finetuned, the fine-tuning it started from)
    ws_s = info["ws_train_s"] = info["train_s"]["supernet"] + ws.settings["train_stats"].get("finetune_seconds", 0.0)
    old = saved.get("info")
    if old is not None and abs(old["unpruned_ms"] - unpruned_ms) > 1e-6:
        sys.exit(f"{saved.path} was placed on another latency table (unpruned model {old['unpruned_ms']:.2f} ms, "
                 f"this table {unpruned_ms:.2f} ms); pass another --out to compare on this one")
    saved.put("info", info)
    num_params = space.num_parameters

    if saved.get("unpruned") is None:
        t = time.perf_counter()
        p = _point(full, unpruned_ms, num_params(full), ev_std(full))
        saved.put("unpruned", {"points": [p], "seconds": info["train_s"]["standard"] + time.perf_counter() - t})

    if saved.get("nas") is None:
        hold = ws.encoded("holdout", max_samples=args.search_samples, seed=0)
        ev_hold = Evaluator(ws.supernet, hold, spec, param_count=num_params,
                            store=ws.evaluation_store("holdout", args.search_samples, 0))

        def evaluate(subnet):
            return {"error": ev_hold(subnet)["error"], "latency": table.predict_latency(subnet)}

        t = time.perf_counter()
        res = run_search(space, evaluate, objectives=("error", "latency"), method="nsga2", n_evals=args.n_evals,
                         pop_size=args.pop_size, seed=0, history_path=folder / "nas_history.csv",
                         normalizers={"latency": unpruned_ms}, progress=progress)
        pts = [_point(r["subnet"], r["latency"], num_params(r["subnet"]), ev_ws(r["subnet"]),
                      holdout_error=r["error"]) for r in res.pareto]
        saved.put("nas", {"points": pts, "search_s": res.wall_time, "n_evals": len(res.records),
                          "seconds": ws_s + time.perf_counter() - t})

    if saved.get("uniform") is None:
        t = time.perf_counter()
        pts = [_point(s, table.predict_latency(s), num_params(s), ev_ws(s), ratio=r)
               for r, s in ((r, uniform_subnet(dims, r)) for r in (1.0,) + UNIFORM_RATIOS)]
        saved.put("uniform", {"points": pts, "seconds": ws_s + time.perf_counter() - t})

    if saved.get("rfp") is None:
        t = time.perf_counter()
        budgets = sorted({round(f * unpruned_ms, 4) for f in BUDGETS + RFP_EXTRA}, reverse=True)
        train_enc = std.encoded("train", max_samples=args.rfp_samples, seed=0)
        pts = []
        for r in prune(std.supernet.model, train_enc, spec, budgets, table, n_samples=args.rfp_samples, seed=0,
                       progress=progress):
            model = point_supernet(std, r.subnet, r.scales.to_dict() if r.scales is not None else None)
            m = Evaluator(model, dev, spec)(r.subnet)
            pts.append(_point(r.subnet, table.predict_latency(r.subnet), num_params(r.subnet), m, budget=r.budget))
        saved.put("rfp", {"points": pts, "seconds": info["train_s"]["standard"] + time.perf_counter() - t})

    done = {p["k"]: p for p in (saved.get("layer-drop") or {}).get("points", [])}
    seconds = (saved.get("layer-drop") or {}).get("seconds", 0.0)
    train_enc = None
    for k in range(1, dims.num_layers):
        if k in done:
            continue
        if train_enc is None:
            train_enc = ws.encoded("train")
        t = time.perf_counter()
        s = layer_drop_subnet(dims, k)
        m = fine_tuned_score(std, s, train_enc, dev, epochs, args.batch_size, progress)
        seconds += time.perf_counter() - t
        done[k] = _point(s, table.predict_latency(s), num_params(s), m, k=k)
        saved.put("layer-drop", {"points": sorted(done.values(), key=lambda p: p["k"]), "seconds": seconds})
    for name in METHODS:
        entry = saved.get(name)
        entry["front"] = [p["key"] for p in front(entry["points"])]
        saved.put(name, entry)
    return saved.data


def fine_tuned_score(std, subnet, train_enc, dev, epochs: float, batch_size: int, progress: bool,
                     importance: dict | None = None) -> dict:
    """``subnet`` sliced from the pre-trained model that ``std`` (the standard fine-tuning run) started from,
    re-ordered by ``importance`` first if given, fine-tuned the standard way on ``train_enc``, scored on ``dev``."""
    import torch

    from toolchain.evaluation import score_model
    from toolchain.training import fine_tune
    from toolchain.core.modeling import load_model
    from toolchain.core.slicing import slice_model
    from toolchain.core.supernet import SuperNetwork
    from toolchain.training import TrainConfig

    spec = std.spec
    torch.manual_seed(0)
    pretrained, _ = load_model(std.settings.get("model"), num_labels=spec.num_labels, regression=spec.is_regression)
    if importance is not None:
        SuperNetwork(pretrained).reorder_(importance["head_order"], importance["unit_order"])
    model = slice_model(pretrained, subnet)
    fine_tune(model, train_enc, TrainConfig(strategy="standard", epochs=epochs, batch_size=batch_size, seed=0),
              progress=progress)
    return score_model(model, dev, spec)


def choose(method: str, entry: dict, budget_ms: float) -> dict | None:
    """What a user of ``method`` ships under ``budget_ms``: NAS, the best held-out score under the budget; rfp,
    the mask found for that budget (or the best under it); uniform / layer dropping, the largest model under it."""
    from toolchain.search import best_under as pick

    fits = [p for p in entry["points"] if p["latency"] <= budget_ms + 1e-9]
    if not fits:
        return None
    if method == "nas":
        return pick(fits, budget_ms, score="holdout_error")
    if method == "rfp":
        exact = [p for p in fits if abs(p["budget"] - budget_ms) < 1e-3]
        return exact[0] if exact else pick(fits, budget_ms)
    return max(fits, key=lambda p: p["latency"])


# -------------------------------------------------------------------------------------------- measurement
def measure(results: dict, args) -> dict:
    """The ONNX model of every chosen point (and the unpruned one in fp32 and int8) measured on the target."""
    from latency_models.calibration import measure_subnet
    from latency_models.grid import Worker
    from toolchain.core.modeling import load_model
    from toolchain.core.subnetwork import SubNetwork

    path = Path(args.out) / "measured.json"
    saved = Saved(path)
    todo = {}
    for task, r in results.items():
        u = r["unpruned"]["points"][0]
        todo[(u["key"], "fp32")] = u["subnet"]
        todo[(u["key"], "int8")] = u["subnet"]
        for f in BUDGETS:
            for m in METHODS:
                p = choose(m, r[m], f * r["info"]["unpruned_ms"])
                if p is not None:
                    todo[(p["key"], "fp32")] = p["subnet"]
    model = None
    with Worker() as worker:
        for (key, prec), sub in todo.items():
            name = f"{key}-{prec}"
            if saved.get(name) is not None:
                continue
            if model is None:
                model, _ = load_model(None)
            res = measure_subnet(model, SubNetwork.from_dict(sub), args.target, prec, worker=worker)
            saved.put(name, res["latency_ms"])
            print(f"  measured {name}: {res['latency_ms']:.2f} ms", flush=True)
    return saved.data


def int8_metric(task: str, args, saved: Saved) -> float:
    """The unpruned int8 ONNX model's dev metric (exported, fused, quantized; scored by ONNX Runtime)."""
    if saved.get("int8_score") is not None:
        return saved.get("int8_score")
    from toolchain.ship.export import export_point
    from toolchain.run import load_run
    from toolchain.ship.verify import MetricData

    std = load_run(standard_folder(Path(args.out) / task, args))
    ds = std.data.load("validation")
    if args.dev_samples and args.dev_samples < len(ds):
        import numpy as np

        ds = ds.sample(args.dev_samples, 0)
    res = export_point(std.supernet, std.space.largest(), std.tokenizer, Path(args.out) / task / "int8", precision="int8",
                       seq_len=128, metric_data=MetricData.from_dataset(ds, std.tokenizer, max_length=128),
                       measure=False, memory=False, overwrite=True)
    return saved.put("int8_score", float(res.metric["score"]))


# ------------------------------------------------------------------------------------------- extras (one task)
def extras(task: str, args, table, saved: Saved) -> dict:
    import numpy as np

    from toolchain.evaluation import Evaluator
    from toolchain.search.hypervolume import hypervolume
    from toolchain.run import load_run
    from toolchain.search import run_search
    from toolchain.core.search_space import SPACE_NAMES, make_space

    folder = Path(args.out) / task
    ws = load_run(folder / supernet_name(args))
    std = load_run(standard_folder(folder, args))
    info = saved.get("info")
    spec, dims, unpruned_ms = ws.spec, ws.supernet.dims, info["unpruned_ms"]
    dev = ws.encoded("validation", max_samples=args.dev_samples, seed=0)
    ev_dev = Evaluator(ws.supernet, dev, spec, param_count=ws.space.num_parameters,
                       store=ws.evaluation_store("validation", args.dev_samples, 0))
    hold = ws.encoded("holdout", max_samples=args.search_samples, seed=0)
    ev_hold = Evaluator(ws.supernet, hold, spec, param_count=ws.space.num_parameters,
                        store=ws.evaluation_store("holdout", args.search_samples, 0))
    norm = {"latency": unpruned_ms}

    spaces = saved.get("spaces") or {}
    for name in SPACE_NAMES:
        if name in spaces:
            continue
        space = make_space(name, dims, ws.space.fixed_params)

        def evaluate(subnet):
            return {"error": ev_hold(subnet)["error"], "latency": table.predict_latency(subnet)}

        res = run_search(space, evaluate, objectives=("error", "latency"), method="nsga2", n_evals=args.n_evals,
                         pop_size=args.pop_size, seed=0, history_path=folder / f"space-{name}.csv",
                         normalizers=norm, progress=not args.no_progress)
        pts = [{"latency": r["latency"], "error": ev_dev(r["subnet"])["error"], "holdout_error": r["error"]}
               for r in res.pareto]
        spaces[name] = {"hv_holdout": res.hypervolume,
                        "hv_dev": hypervolume([[p["error"], p["latency"]] for p in pts], ("error", "latency"), norm),
                        "search_s": res.wall_time, "n_front": len(pts), "points": pts}
        saved.put("spaces", spaces)

    # weight-sharing vs standard NAS: the same candidates, scored with the shared weights or fine-tuned each
    std_nas = saved.get("standard_nas") or {"candidates": []}
    rng = np.random.default_rng(0)
    candidates = [ws.space.sample(rng) for _ in range(args.std_nas_candidates)]
    imp = json.loads((ws.folder / "importance.json").read_text())
    train_enc = None
    for i, s in enumerate(candidates):
        if i < len(std_nas["candidates"]):
            continue
        if train_enc is None:
            train_enc = ws.encoded("train")
        t = time.perf_counter()
        # sliced in the same importance order the super-network uses
        std_err = fine_tuned_score(std, s, train_enc, dev, info["epochs"], args.batch_size, not args.no_progress,
                                   imp)["error"]
        secs = time.perf_counter() - t
        t = time.perf_counter()
        ws_err = ev_dev(s)["error"]
        std_nas["candidates"].append({"subnet": s.to_dict(), "latency": table.predict_latency(s),
                                      "standard_error": std_err, "standard_s": secs, "ws_error": ws_err,
                                      "ws_eval_s": time.perf_counter() - t})
        saved.put("standard_nas", std_nas)
    c = std_nas["candidates"]
    from scipy.stats import kendalltau

    for kind in ("standard", "ws"):
        pts = [[x[f"{kind}_error"], x["latency"]] for x in c]
        std_nas[f"hv_{kind}"] = hypervolume(pts, ("error", "latency"), norm)
        std_nas[f"front_{kind}"] = len(front([{"error": e, "latency": lat} for e, lat in pts]))
    std_nas["kendall_tau"] = float(kendalltau([x["standard_error"] for x in c], [x["ws_error"] for x in c])[0])
    std_nas["standard_total_s"] = sum(x["standard_s"] for x in c)
    std_nas["ws_total_s"] = info["ws_train_s"] + sum(x["ws_eval_s"] for x in c)
    saved.put("standard_nas", std_nas)
    return saved.data


# ----------------------------------------------------------------------------------------------------- report
def hv(points, unpruned_ms) -> float:
    from toolchain.search.hypervolume import hypervolume

    return hypervolume([[p["error"], p["latency"]] for p in points], ("error", "latency"), {"latency": unpruned_ms})


def plot(results: dict, measured: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    styles = {"nas": ("C0", "o-"), "rfp": ("C1", "s-"), "uniform": ("C2", "^-"), "layer-drop": ("C3", "v-")}
    for ax, task in zip(axes[0], tasks):
        r = results[task]
        info = r["info"]
        for m in METHODS:
            pts = sorted((p for p in r[m]["points"] if p["key"] in r[m]["front"]), key=lambda p: p["latency"])
            c, st = styles[m]
            ax.plot([p["latency"] for p in pts], [p["score"] for p in pts], st, color=c, ms=4, label=LABELS[m])
        u = r["unpruned"]["points"][0]
        ax.plot([u["latency"]], [u["score"]], "k*", ms=11, label=LABELS["unpruned"])
        i8 = measured.get(f"{u['key']}-int8")
        if i8 is not None and r.get("int8_score") is not None:
            ax.plot([i8], [r["int8_score"]], "kX", ms=9, label=LABELS["unpruned-int8"] + " (measured ms)")
        for f in BUDGETS:
            ax.axvline(f * info["unpruned_ms"], color="0.7", ls=":", lw=1)
        ax.set_title(f"{task.upper()} (dev, n={info['dev_examples']})")
        ax.set_xlabel("latency on this CPU, ms (fp32, table)")
        ax.set_ylabel(info["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, measured: dict, extra: dict | None, args) -> str:
    tasks = list(results)
    lines = [
        f"Command: `python benchmarks/bench_baselines.py` ({machine()}). Every task: at most {args.train_examples} "
        f"training examples (a seeded subset; held-out {args.holdout:.0%} of train excluded first), "
        f"{args.train_examples} examples' worth of steps and at most {args.max_epochs:g} epochs, batch "
        f"{args.batch_size}, for every model that is trained; the super-network ({args.strategy}) starts from the "
        f"{'standard fine-tuned' if args.init == 'finetuned' else 'pre-trained'} model (`--init {args.init}`); "
        f"NAS {args.n_evals} candidates (NSGA-II, "
        f"population {args.pop_size}) scored on at most {args.search_samples} held-out training examples, every "
        f"point scored on the dev set (at most {args.dev_samples} examples, seeded) as a test set. Latency: the "
        "calibrated fp32 table of this CPU (batch 1, sequence 128); the point each method ships under a budget is "
        "also measured end to end as ONNX (\"meas\").",
        "",
        "| task | metric | training examples | epochs | held-out (searched on) | dev | train s: standard / super-network |",
        "| --- | --- | ---: | ---: | --- | ---: | --- |",
        *(f"| {t.upper()} | {i['metric']} | {i['train_examples']} | {i['epochs']:g} | {i['holdout_examples']} "
          f"({i['search_examples']}) | {i['dev_examples']} | {i['train_s']['standard']:.0f} / "
          f"{i['train_s']['supernet']:.0f} |" for t, i in ((t, results[t]["info"]) for t in tasks)),
        "",
        "![fronts of all methods per task](images/baselines.png)",
        "",
        "### Task metric under a latency budget (share of the unpruned fp32 latency)",
        "",
        "Dev metric of the point each method would ship (NAS: best held-out score under the budget; rfp: the mask "
        "searched for that budget; uniform and layer dropping: the largest model under it), and its measured "
        "latency. `-`: the method has no point under that budget.",
        "",
    ]
    head = "| task | unpruned fp32 | unpruned int8 | budget | " + " | ".join(LABELS[m] for m in METHODS) + " |"
    lines += [head, "|" + " --- |" * (4 + len(METHODS))]
    wins = {f: {"alone": 0, "tied": 0, "behind": 0} for f in BUDGETS}
    for task in tasks:
        r = results[task]
        info, u = r["info"], r["unpruned"]["points"][0]
        i8 = measured.get(f"{u['key']}-int8")
        i8s = r.get("int8_score")
        for j, f in enumerate(BUDGETS):
            b = f * info["unpruned_ms"]
            cells = []
            chosen = {m: choose(m, r[m], b) for m in METHODS}
            best = max((p["score"] for p in chosen.values() if p), default=None)
            for m in METHODS:
                p = chosen[m]
                if p is None:
                    cells.append("-")
                    continue
                meas = measured.get(f"{p['key']}-fp32")
                txt = f"{p['score']:.3f} ({meas:.1f} ms)" if meas is not None else f"{p['score']:.3f}"
                cells.append(f"**{txt}**" if p["score"] == best else txt)
            nas = chosen["nas"]
            others = [p["score"] for m, p in chosen.items() if m != "nas" and p]
            if nas and all(nas["score"] > s for s in others):
                wins[f]["alone"] += 1
            elif nas and all(nas["score"] >= s for s in others):
                wins[f]["tied"] += 1
            else:
                wins[f]["behind"] += 1
            first = j == 0
            um = measured.get(f"{u['key']}-fp32")
            u_cell = f"{u['score']:.3f}" + (f" ({um:.1f} ms)" if um is not None else "")
            i8_cell = f"{i8s:.3f} ({i8:.1f} ms)" if i8 is not None and i8s is not None else "-"
            lines.append(
                f"| {task.upper() if first else ''} | {u_cell if first else ''} | {i8_cell if first else ''} | "
                f"{f:.0%} = {b:.1f} ms | " + " | ".join(cells) + " |")
    lines += ["", "The point NAS ships is the best of all methods (alone / tied / behind) at " +
              ", ".join(f"{f:.0%}: {w['alone']} / {w['tied']} / {w['behind']}" for f, w in wins.items()) +
              f" of {len(tasks)} tasks.", ""]

    lines += ["### Where NAS loses points", "",
              "The super-network's full network against the standard fine-tuned one (both on dev), and per budget "
              "the point NAS ships (chosen on the held-out split) against the best dev score among NAS's own front "
              "points under the budget, which no user could choose without looking at the test set: the gap is what "
              "the held-out choice costs.", "",
              "| task | standard full | super-network full | " + " | ".join(f"{f:.0%}: shipped / best on dev"
                                                                      for f in BUDGETS) + " |",
              "|" + " --- |" * (3 + len(BUDGETS))]
    for task in tasks:
        r = results[task]
        u = r["unpruned"]["points"][0]
        ws_full = next((p for p in r["uniform"]["points"] if p.get("ratio") == 1.0), None)
        cells = []
        for f in BUDGETS:
            b = f * r["info"]["unpruned_ms"]
            shipped = choose("nas", r["nas"], b)
            fits = [p["score"] for p in r["nas"]["points"] if p["latency"] <= b + 1e-9]
            cells.append(f"{shipped['score']:.3f} / {max(fits):.3f}" if shipped else "-")
        ws_cell = f"{ws_full['score']:.3f}" if ws_full else "-"
        lines.append(f"| {task.upper()} | {u['score']:.3f} | {ws_cell} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["### Hypervolume and wall time per method", "",
              "Hypervolume of each method's points on (dev error, latency / unpruned latency), reference point 1.1 "
              "(higher is better). Wall time: everything the method needs from the pre-trained model (training, "
              "search or mask search, scoring), on this 2-core machine.", "",
              "| task | " + " | ".join(f"HV {LABELS[m]}" for m in METHODS) + " | "
              + " | ".join(f"s {LABELS[m]}" for m in METHODS) + " |",
              "|" + " --- |" * (1 + 2 * len(METHODS))]
    for task in tasks:
        r = results[task]
        un = r["info"]["unpruned_ms"]
        lines.append(f"| {task.upper()} | " + " | ".join(f"{hv(r[m]['points'], un):.3f}" for m in METHODS) + " | "
                     + " | ".join(f"{r[m]['seconds']:.0f}" for m in METHODS) + " |")
    lines.append("")
    if extra:
        sp, sn = extra.get("spaces", {}), extra.get("standard_nas", {})
        task = args.extras_task.upper()
        if sp:
            lines += [f"### The four search spaces ({task}, the same super-network, NSGA-II, {args.n_evals} candidates)",
                      "", "The super-network was trained by sampling the MEDIUM space; every space is searched on "
                      "those same weights.", "",
                      "| space | HV held-out | HV dev | front size | search s |", "| --- | --- | --- | --- | --- |"]
            for name, s in sp.items():
                cached = " (the NAS run's evaluations, cached)" if name == "medium" else ""
                lines.append(f"| {name} | {s['hv_holdout']:.3f} | {s['hv_dev']:.3f} | {s['n_front']} | "
                             f"{s['search_s']:.0f}{cached} |")
            lines.append("")
        if sn.get("candidates"):
            n = len(sn["candidates"])
            lines += [f"### Weight-sharing NAS vs standard NAS ({task}, the same {n} random MEDIUM candidates)", "",
                      "Standard NAS fine-tunes every candidate on its own (sliced from the importance-ordered "
                      "pre-trained model, the same training data and epochs); weight-sharing NAS scores it with the "
                      "super-network's weights.", "",
                      "| | standard NAS | weight-sharing NAS |", "| --- | --- | --- |",
                      f"| wall time, s | {sn['standard_total_s']:.0f} (fine-tuning {n} models) | "
                      f"{sn['ws_total_s']:.0f} ({'standard fine-tuning + ' if args.init == 'finetuned' else ''}"
                      f"super-network training + {n} evaluations) |",
                      f"| hypervolume of the {n} candidates (dev) | {sn['hv_standard']:.3f} | {sn['hv_ws']:.3f} |",
                      f"| mean dev error | {sum(x['standard_error'] for x in sn['candidates']) / n:.3f} | "
                      f"{sum(x['ws_error'] for x in sn['candidates']) / n:.3f} |",
                      f"| rank agreement (Kendall tau of the errors) | {sn['kendall_tau']:.2f} | |", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
SETTINGS = ("train_examples", "max_epochs", "batch_size", "holdout", "search_samples", "dev_samples", "n_evals",
            "pop_size", "rfp_samples", "target", "strategy", "init")


def check_settings(saved: Saved, args) -> None:
    """Saved results belong to the settings that made them: reuse them only with the same ones."""
    mine = {k: getattr(args, k) for k in SETTINGS}
    old = saved.get("settings")
    if old is None and saved.data:
        old = {}
    if old is not None:
        old = {"init": "pretrained", **old}  # results from before --init existed
    if old is not None and old != mine:
        diff = ", ".join(f"{k}: {old.get(k)} -> {mine[k]}" for k in SETTINGS if old.get(k) != mine[k])
        sys.exit(f"{saved.path} was made with other settings ({diff}); pass another --out or delete that folder")
    if old is None and not args.report_only:
        saved.put("settings", mine)


def get_table(args):
    from latency_models.lookup_table import LatencyTable
    from targets import load_target
    from toolchain.options import CompileOptions
    from toolchain.tables import latency_table_for
    from toolchain.core.modeling import ModelDims, load_config

    _, config = load_config(None)
    dims = ModelDims.from_config(config)
    path = table_path(ROOT / "benchmarks" / "results", dims, args.target, "fp32")
    if path.is_file():
        return LatencyTable.load(path)
    target = load_target(args.target)
    return latency_table_for(CompileOptions(target=args.target), target, "fp32", dims, config)


def main(argv=None) -> int:
    from toolchain.run import INITS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--train-examples", type=int, default=4000, help="training examples per task (seeded subset)")
    ap.add_argument("--max-epochs", type=float, default=3.0, help="small tasks: epochs up to this many")
    ap.add_argument("--strategy", default="kd", help="super-network training strategy (NAS and uniform; default: kd)")
    ap.add_argument("--init", choices=INITS, default="finetuned",
                    help="the super-network starts from the pre-trained model (the paper) or from the standard "
                         "fine-tuned one, which its training time then includes (default: finetuned)")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch size (every method)")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of train held out for the search")
    ap.add_argument("--search-samples", type=int, default=400, help="held-out examples a search scores on")
    ap.add_argument("--dev-samples", type=int, default=500, help="dev (test) examples per task")
    ap.add_argument("--n-evals", type=int, default=100)
    ap.add_argument("--pop-size", type=int, default=20)
    ap.add_argument("--rfp-samples", type=int, default=256)
    ap.add_argument("--extras-task", default="sst2", help="task of the search-space and standard-NAS comparisons")
    ap.add_argument("--std-nas-candidates", type=int, default=8)
    ap.add_argument("--no-extras", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke sizes (not for docs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baselines"))
    ap.add_argument("--report-only", action="store_true", help="tables and plots from the saved results")
    ap.add_argument("--no-docs", action="store_true", help="print, but do not write docs/benchmarks.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_examples, args.n_evals, args.pop_size, args.search_samples = 300, 12, 6, 100
        args.dev_samples, args.rfp_samples, args.std_nas_candidates, args.no_docs = 100, 64, 2, True
        args.out = args.out + "-quick"
    args.data_dir = data_dir()
    logging.basicConfig(level=logging.WARNING)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    t0 = time.time()
    table = get_table(args)
    results = {}
    for task in tasks:
        saved = Saved(Path(args.out) / task / "results.json")
        check_settings(saved, args)
        if not args.report_only:
            print(f"== {task}", flush=True)
            run_task(task, args, table, saved)
        if saved.get("info") is None:
            sys.exit(f"no saved results for {task} in {args.out}; run without --report-only first")
        results[task] = saved.data
    extra = None
    if not args.no_extras and args.extras_task in results:
        saved = Saved(Path(args.out) / args.extras_task / "results.json")
        extra = saved.data if args.report_only else extras(args.extras_task, args, table, saved)
    measured = Saved(Path(args.out) / "measured.json").data if args.report_only else measure(results, args)
    if not args.report_only:
        for task in tasks:
            int8_metric(task, args, Saved(Path(args.out) / task / "results.json"))
            results[task] = Saved(Path(args.out) / task / "results.json").data
    img = (IMAGES / "baselines.png") if not args.no_docs else Path(args.out) / "baselines.png"
    plot(results, measured, img)
    md = report(results, measured, extra, args)
    print(md)
    print(f"\n(wall time of this invocation: {time.time() - t0:.0f} s)")
    if not args.no_docs:
        write_section("bench_baselines", "## Against the baselines (`bench_baselines.py`)\n\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
