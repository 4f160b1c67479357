"""Search methods on the SST-2 super-network (issue: search): NSGA-II vs random search vs local search.

Objectives: validation error with shared weights (on a seeded SST-2 dev subsample) and latency predicted by the
target's latency table. Every method gets the same budget of distinct evaluations, 3 seeds each. Reported: the
hypervolume (fixed normalisation: error as is, latency / unpruned latency, reference point 1.1; see
docs/search.md) after 25 %, 50 % and 100 % of the budget, median (min-max) over seeds.

The error of a sub-network does not depend on who asks for it, so one cached evaluator serves all runs (each
distinct sub-network is run on the data once). Each run is charged what its candidates cost when they were first
evaluated (measured, stored per sub-network) plus its own search-loop time (proposals, sorting, history), so the
reported wall time and evaluations per second are those of a run that had to evaluate everything itself.

Before the search it measures the evaluator's two modes (masked super-network vs sliced model) on sub-networks of
every size: the crossover is what ``Evaluator(mode="auto")``'s ``slice_below`` is set from.

    python benchmarks/bench_search.py --run runs/bench/sst2-standard-4000 [--n-evals 100] [--eval-samples 300]
        [--latency-table table.json]   # default: the cached table of --target, profiled if there is none
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import machine, publish, stats
from toolchain.evaluation import Evaluator
from toolchain.run import load_run
from toolchain.search import run_search, summarize

METHODS = ("nsga2", "random", "local")


def latency_table(args, dims):
    from latency_models.cache import find_table, run_profile
    from latency_models.lookup_table import LatencyTable

    if args.latency_table:
        return LatencyTable.load(args.latency_table)
    table = find_table(args.target, None, dims)
    if table is None:
        print(f"no cached latency table for {args.target}; profiling (cached afterwards)", flush=True)
        table = LatencyTable.load(run_profile(target=args.target, progress=True))
    table.check_model(dims)
    return table


def anytime_hv(result, fractions):
    """Hypervolume of the first ``f * len(records)`` candidates (same fixed normalisation)."""
    out = []
    for f in fractions:
        n = max(1, int(round(f * len(result.records))))
        out.append(summarize(result.records[:n], result.objectives, result.normalizers)[2])
    return out


def crossover(ev, space, n_per_bin: int = 2, reps: int = 3, seed: int = 0):
    """Median seconds of a masked vs a sliced evaluation, by fraction of the full network's parameters kept."""
    rng = np.random.default_rng(seed)
    full = space.num_parameters(space.largest())
    bins = [(lo / 10, (lo + 1) / 10) for lo in range(3, 10)]
    picked: dict[tuple, list] = {b: [] for b in bins}
    for _ in range(5000):
        sn = space.sample(rng)
        f = space.num_parameters(sn) / full
        for b in bins:
            if b[0] <= f < b[1] and len(picked[b]) < n_per_bin:
                picked[b].append(sn)
        if all(len(v) == n_per_bin for v in picked.values()):
            break
    picked[(1.0, 1.0)] = [space.largest()]
    rows = []
    ev.logits(space.largest(), mode="mask")  # warm-up
    for b, subnets in picked.items():
        for sn in subnets:
            t = {"mask": [], "slice": []}
            for _ in range(reps):
                for mode in ("mask", "slice"):
                    t0 = time.perf_counter()
                    ev.logits(sn, mode=mode)
                    t[mode].append(time.perf_counter() - t0)
            rows.append((space.num_parameters(sn) / full, float(np.median(t["mask"])), float(np.median(t["slice"]))))
    rows.sort()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bench/sst2-standard-4000", help="trained SST-2 run folder")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--latency-table")
    ap.add_argument("--n-evals", type=int, default=100)
    ap.add_argument("--pop-size", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=300, help="SST-2 dev subsample for the search error")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(2)

    run = load_run(args.run)
    space = run.space
    table = latency_table(args, space.dims)
    ev = Evaluator(run.supernet, run.encoded("validation", max_samples=args.eval_samples, seed=0), run.spec,
                   param_count=space.num_parameters)

    def evaluate(subnet):
        return {"error": ev(subnet)["error"], "latency": table.predict_latency(subnet),
                "params": float(space.num_parameters(subnet))}

    normalizers = {"latency": table.predict_latency(space.largest())}

    print("mask vs slice evaluation time by size ...", flush=True)
    cross = crossover(ev, space)
    for f, m, sl in cross:
        print(f"  params {f:5.1%}  mask {m:.3f}s  slice {sl:.3f}s  slice/mask {sl / m:.2f}", flush=True)
    slower = [f for f, m, sl in cross if sl >= m]
    faster = [f for f, m, sl in cross if sl < m]
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = (0.25, 0.5, 1.0)
    hv: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    front: dict[str, list[int]] = {m: [] for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    loop: dict[str, list[float]] = {m: [] for m in METHODS}
    rate: dict[str, list[float]] = {m: [] for m in METHODS}
    t0 = time.time()
    for seed in seeds:
        for method in METHODS:
            res = run_search(space, evaluate, objectives=("error", "latency"), method=method, n_evals=args.n_evals,
                             pop_size=args.pop_size, seed=seed, normalizers=normalizers, progress=False)
            keys = [r["key"] for r in res.records]  # no history: every record was evaluated by this run
            loop_s = res.overhead_seconds  # the search's own work: proposals, sorting, bookkeeping
            charged = loop_s + sum(ev.cost[k] for k in keys)  # as if this run had evaluated everything itself
            hv[method].append(anytime_hv(res, fractions))
            front[method].append(len(res.pareto))
            wall[method].append(charged)
            loop[method].append(1000 * loop_s / max(1, len(keys)))
            rate[method].append(len(keys) / charged)
            print(f"seed {seed} {method:6s} HV " + " ".join(f"{v:.4f}" for v in hv[method][-1])
                  + f"  pareto {len(res.pareto)}  wall {charged:.0f}s  {len(keys) / charged:.2f} evals/s  loop "
                  f"{loop[method][-1]:.1f} ms/eval  ({ev.calls} distinct sub-networks run so far, "
                  f"{time.time() - t0:.0f}s)", flush=True)

    md = ["## Search methods (SST-2, error + latency)\n",
          f"`python benchmarks/bench_search.py --run {args.run} --n-evals {args.n_evals} --eval-samples "
          f"{args.eval_samples}` -- {run.settings.get('train', {}).get('strategy', '?')} super-network "
          f"({space.name.upper()} space), error on a seeded {args.eval_samples}-example SST-2 dev subsample, latency "
          f"predicted by the {args.target} table (unpruned: {normalizers['latency']:.2f} ms). Budget "
          f"{args.n_evals} distinct evaluations per run (NSGA-II population {args.pop_size}), seeds "
          f"{args.seeds}. Hypervolume with the fixed normalisation of docs/search.md (error as is, latency / "
          f"unpruned latency, reference point 1.1); median (min-max) over seeds. Machine: {machine()}.\n",
          "| method | HV @ 25 % budget | HV @ 50 % | HV @ 100 % | Pareto points (median) | wall time (s) | "
          "evals / s | search-loop overhead (ms / eval) |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        cols = []
        for j in range(len(fractions)):
            s = stats([h[j] for h in hv[method]])
            cols.append(f"{s['median']:.4f} ({s['min']:.4f}-{s['max']:.4f})")
        md.append(f"| {method} | " + " | ".join(cols) + f" | {np.median(front[method]):.0f} | "
                  f"{np.median(wall[method]):.0f} | {np.median(rate[method]):.2f} | {np.median(loop[method]):.1f} |")
    best = {m: np.median([h[-1] for h in hv[m]]) for m in METHODS}
    md.append("")
    md.append(f"Wall time = the run's own search-loop time + the measured first-evaluation time of every candidate it "
              f"visited (one shared cache serves all runs, so each run is charged as if it had evaluated everything "
              f"itself). Median final hypervolume: NSGA-II {best['nsga2']:.4f}, random {best['random']:.4f}, local "
              f"{best['local']:.4f}: NSGA-II {'beats' if best['nsga2'] > best['random'] else 'does NOT beat'} random "
              f"search.\n")
    md.append(f"Evaluator modes, time to evaluate one sub-network on the {args.eval_samples}-example subsample "
              f"(median of 3, batch 64; parameters as a share of the unpruned network's, embeddings included):\n")
    md.append("| params kept | masked (s) | sliced (s) | sliced / masked |")
    md.append("| ---: | ---: | ---: | ---: |")
    for f, m, sl in cross:
        md.append(f"| {f:.0%} | {m:.3f} | {sl:.3f} | {sl / m:.2f} |")
    md.append("")
    md.append(f"Slicing was faster for {len(faster)} of {len(cross)} sub-networks "
              f"(largest share where it was faster: {max(faster):.0%}; smallest share where masking was faster: "
              f"{min(slower):.0%})." if faster and slower else
              f"Slicing was faster for {len(faster)} of {len(cross)} sub-networks.")
    publish("bench_search", md, write=not args.no_write)


if __name__ == "__main__":
    main()
