"""The search's shared-weight evaluations in float32 and under bfloat16 autocast, side by side (issue: accurate at
speed, "fit it in the time").

For the sub-networks of a compile's front (``--front``, its ``pareto.json``) and ``--random`` more drawn from the
super-network's search space (seeded), the task metric on the search's validation subsample (``--samples`` dev
examples, as a default compile draws them) computed both ways, alternating per sub-network so that both see the same
machine speed. Prints and writes the seconds of each, their ratio, and how far the scores differ (mean and largest
absolute difference, Spearman rank correlation): what ``CompileOptions.search_dtype="auto"`` rests on.

    python benchmarks/bench_search_dtype.py --run <cache>/supernets/<key> --front <out>/pareto.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a compile's cached super-network (or a trained run folder)")
    ap.add_argument("--front", help="pareto.json of a compile of that super-network: its points are evaluated too")
    ap.add_argument("--random", type=int, default=24, help="random sub-networks of the run's space (default 24)")
    ap.add_argument("--samples", type=int, default=400, help="dev examples (the default preset's search subsample)")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    import numpy as np
    from scipy.stats import spearmanr

    from toolchain.core.subnetwork import SubNetwork
    from toolchain.evaluation import Evaluator, bf16_supported
    from toolchain.run import load_run

    run = load_run(args.run)
    enc = run.encoded("validation", max_samples=args.samples, seed=0)
    evaluators = {d: Evaluator(run.supernet, enc, run.spec, param_count=run.space.num_parameters, dtype=d)
                  for d in ("fp32", "bf16")}
    subnets = [SubNetwork(**r["subnet"]) for r in json.loads(Path(args.front).read_text())["pareto"]] \
        if args.front else []
    rng = np.random.default_rng(0)
    subnets += [run.space.sample(rng) for _ in range(args.random)]
    seconds = {d: 0.0 for d in evaluators}
    scores = {d: [] for d in evaluators}
    for s in subnets:
        for d, ev in evaluators.items():
            t = time.perf_counter()
            scores[d].append(ev(s)["score"])
            seconds[d] += time.perf_counter() - t
    a, b = np.array(scores["fp32"]), np.array(scores["bf16"])
    diff = np.abs(a - b)
    rho = float(spearmanr(a, b)[0])
    ratio = seconds["fp32"] / seconds["bf16"]
    print(f"fp32 {seconds['fp32']:.1f} s, bf16 {seconds['bf16']:.1f} s: {ratio:.2f}x; |score difference| mean "
          f"{diff.mean():.4f}, max {diff.max():.4f}; Spearman {rho:.4f} ({len(subnets)} sub-networks)")
    rows = [["float32", f"{seconds['fp32']:.1f}", "1.00", "", "", ""],
            ["bfloat16 autocast", f"{seconds['bf16']:.1f}", f"{ratio:.2f}", f"{diff.mean():.4f}", f"{diff.max():.4f}",
             f"{rho:.4f}"]]
    md = ["## Search evaluations: float32 vs bfloat16 autocast (`bench_search_dtype.py`)", "",
          f"`python benchmarks/bench_search_dtype.py --run <super-network>"
          + (" --front <pareto.json>" if args.front else "") + f" --random {args.random} --samples {args.samples}`. "
          f"Machine: {machine()}; native bf16 (AVX512-BF16/AMX): {'yes' if bf16_supported() else 'no'}. "
          f"Super-network: {run.data.describe()}, {run.settings.get('space', run.space.__class__.__name__)} space; "
          f"{len(subnets)} sub-networks ({len(subnets) - args.random} of the front, {args.random} random), each "
          f"scored ({run.spec.metric}) on {len(enc['labels'])} dev examples with the shared weights both ways, "
          f"alternating; one dev example is {1 / len(enc['labels']):.4f} of accuracy.", ""]
    md += markdown_table(["evaluation", "seconds", "speed-up", "mean abs. score difference", "max abs. score difference",
                          "Spearman vs fp32"], rows, right={1, 2, 3, 4, 5})
    publish("bench_search_dtype", md, write=not args.no_docs)


if __name__ == "__main__":
    main()
