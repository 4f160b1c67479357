"""Search speed with N local workers (issue: scale out on Ray): the local executor vs Ray workers on this machine.

One NSGA-II search of the trained SST-2 super-network (error on a seeded dev subsample + predicted latency, as
``nasprune-compile`` does), repeated with:

* ``local``: the default executor, every candidate in this process (torch with ``--threads`` threads);
* ``ray xN``: N Ray workers (actors) on a local Ray instance on 127.0.0.1, each holding one copy of the
  super-network and running torch with one thread.

Each run starts from an empty evaluation cache (nothing is reused between runs or from the run folder's store, which
is not touched). Reported: wall time of the whole search (min / median / max over ``--repeats``), including the start
of the Ray workers (separately timed as well: starting N actors and shipping them the super-network), evaluations per
second, and the speed-up over the local executor and over one Ray worker. Every run must return the same Pareto set
(same seed): the script checks it.

    python benchmarks/bench_executor.py --run runs/bench/sst2-sandwich-4000 [--workers 1,2] [--n-evals 40]
        [--eval-samples 200] [--repeats 3] [--latency-table benchmarks/results/bert-384-cpu-fp32.json]
    python benchmarks/bench_executor.py --random-weights --data-dir GLUE --workers 1,2,4,8 --section NAME
        # a machine without the trained run: MiniLM with random weights (the time of an evaluation does not
        # depend on the weights; the Pareto set then means nothing, but must still be the same for every executor)
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

import torch

from common import ROOT, machine, stats, write_section
from toolchain.pipeline import cost_metrics
from toolchain.evaluation import Evaluator, SearchObjective
from toolchain.search.executors import LocalExecutor, RayExecutor, start_local_ray, stop_local_ray
from toolchain.run import load_run
from toolchain.search import run_search

DEFAULT_TABLE = ROOT / "benchmarks" / "results" / "bert-384-cpu-fp32.json"


def params_only(space, subnet):
    return {"params": float(space.num_parameters(subnet))}


def random_weight_run(data_dir):
    """A stand-in for a trained run: the default model's architecture with seeded random weights."""
    from toolchain.core.modeling import ModelDims, load_config, model_from_config
    from toolchain.run import DataSettings, Run
    from toolchain.core.search_space import fixed_parameters, make_space
    from toolchain.core.supernet import SuperNetwork
    from transformers import AutoTokenizer

    path, config = load_config(None)
    torch.manual_seed(0)
    model = model_from_config(config).eval()
    supernet = SuperNetwork(model)
    space = make_space("medium", ModelDims.from_config(config), fixed_parameters(model))
    return Run(Path("."), {}, supernet, AutoTokenizer.from_pretrained(path), space,
               DataSettings(task="sst2", data_dir=data_dir))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bench/sst2-sandwich-4000", help="trained SST-2 run folder (read only)")
    ap.add_argument("--latency-table", default=str(DEFAULT_TABLE),
                    help="latency table for the latency objective (default: bench_latency's; without one the "
                         "objectives are error and parameters)")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to time")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the local executor")
    ap.add_argument("--n-evals", type=int, default=40)
    ap.add_argument("--pop-size", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-weights", action="store_true",
                    help="no trained run: the default model's architecture with random weights, SST-2 dev from "
                         "--data-dir")
    ap.add_argument("--data-dir", default=None, help="GLUE folder for --random-weights")
    ap.add_argument("--section", default="bench_executor", help="docs/benchmarks.md section to write")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()
    load_before = os.getloadavg()

    if args.random_weights:
        run, what = random_weight_run(args.data_dir), "random-weight MiniLM (SST-2 dev)"
    else:
        run = load_run(args.run)
        what = f"{run.settings.get('train', {}).get('strategy', '?')} SST-2 super-network"
    space = run.space
    enc = run.encoded("validation", max_samples=args.eval_samples, seed=args.seed)
    if args.latency_table and Path(args.latency_table).is_file():
        from latency_models.lookup_table import LatencyTable

        table = LatencyTable.load(args.latency_table)
        table.check_model(space.dims)
        cost, objectives = partial(cost_metrics, table, space), ("error", "latency")
    else:
        print(f"no latency table at {args.latency_table}: objectives error and parameters", flush=True)
        cost, objectives = partial(params_only, space), ("error", "params")
    normalizers = {o: cost(space.largest())[o] for o in objectives if o != "error"}

    def objective():  # a fresh evaluator: an empty cache, no store
        return SearchObjective(Evaluator(run.supernet, enc, run.spec, param_count=space.num_parameters), cost)

    def search(executor):
        return run_search(space, objective(), objectives=objectives, method="nsga2", n_evals=args.n_evals,
                          pop_size=args.pop_size, seed=args.seed, normalizers=normalizers, progress=False,
                          executor=executor)

    objective()(space.largest())  # warm up torch in this process, so the first local run is not charged for it
    configs = [("local", LocalExecutor(), args.threads)] + [(f"ray x{w}", None, 1) for w in
                                                           map(int, args.workers.split(","))]
    walls: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    fronts = set()
    t = time.time()
    start_local_ray(num_cpus=os.cpu_count())
    ray_start = time.time() - t
    print(f"local Ray instance started in {ray_start:.1f} s", flush=True)
    try:
        for name, executor, _ in configs:
            if executor is None:
                executor = RayExecutor(workers=int(name.split("x")[1]), cpus_per_worker=1)
            walls[name], starts[name] = [], []
            for rep in range(args.repeats):
                if name != "local":  # how long N actors take to start and receive the super-network
                    t = time.time()
                    pool = executor.pool(objective())
                    pool.pids
                    starts[name].append(time.time() - t)
                    pool.close()
                res = search(executor)
                walls[name].append(res.wall_time)
                fronts.add(tuple(r["key"] for r in res.pareto))
                print(f"{name} run {rep + 1}: {res.wall_time:.1f} s, {len(res.records)} candidates, "
                      f"{len(res.pareto)} on the front, evaluate time {res.eval_seconds:.1f} s "
                      f"({time.time() - t_all:.0f} s so far)", flush=True)
    finally:
        stop_local_ray()
    load_after = os.getloadavg()
    same = len(fronts) == 1
    base = stats(walls["local"])["median"]
    one = stats(walls["ray x1"])["median"] if "ray x1" in walls else None

    cmd = (f"--random-weights --data-dir GLUE --section {args.section}" if args.random_weights else
           f"--run {args.run}")
    md = ["## Search with N local workers (executors)\n",
          f"`python benchmarks/bench_executor.py {cmd} --workers {args.workers} --n-evals {args.n_evals} "
          f"--pop-size {args.pop_size} --eval-samples {args.eval_samples} --repeats {args.repeats}` -- NSGA-II (population {args.pop_size}, "
          f"{args.n_evals} evaluations, seed {args.seed}) on the {what}, objectives {' + '.join(objectives)}, error on a seeded {args.eval_samples}-example "
          f"dev subsample; every run starts with an empty evaluation cache. `local`: the default executor, torch with "
          f"{args.threads} threads in this process; `ray xN`: N Ray actors on a local instance on 127.0.0.1 "
          f"(started once, {ray_start:.1f} s), one torch thread each. Machine: {machine()}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other work ran on this machine).\n",
          "| executor | workers x torch threads | search wall time, s: median (min-max) | evaluations / s | "
          "speed-up vs local | speed-up vs 1 Ray worker | start of the workers, s (median) |",
          "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, _, threads in configs:
        s = stats(walls[name])
        workers = 1 if name == "local" else int(name.split("x")[1])
        start = f"{stats(starts[name])['median']:.1f}" if starts[name] else "-"
        vs_one = f"{one / s['median']:.2f}x" if one else "-"
        md.append(f"| {name} | {workers} x {threads} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                  f"{args.n_evals / s['median']:.2f} | {base / s['median']:.2f}x | "
                  f"{vs_one} | {start} |")
    md.append("")
    md.append(f"Pareto sets of all {sum(len(v) for v in walls.values())} runs: "
              + ("identical (same seed, same candidates, same order)." if same else
                 f"NOT identical ({len(fronts)} different fronts)."))
    text = "\n".join(md)
    print(text)
    if not same:
        raise SystemExit("the executors disagree: see above")
    if not args.no_write:
        write_section(args.section, text)
    print(f"total {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
