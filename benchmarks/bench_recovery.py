"""What recovery buys, and what it costs (issue: accurate at speed).

For sub-networks of a trained super-network (uniform shares of every layer's heads and FFN units), the task metric
on the validation (dev) set with the shared weights, and after recovery (:mod:`toolchain.recover`: slice, distil
from the full network) on 1000 ... 20000 training texts, with the seconds it took. One curve per point.

    python benchmarks/bench_recovery.py --run ~/.cache/nasprune/supernets/<key> [--samples 1000,3000,6000,20000]
                                        [--ratios 0.5,0.35] [--no-docs]

Each recovery goes to a fresh cache folder (nothing reused between sample counts); the teacher's logits are
computed once per sample count and timed separately.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder (or a compile's cached super-network)")
    ap.add_argument("--samples", default="1000,3000,6000,20000", help="training texts per recovery")
    ap.add_argument("--ratios", default="0.5,0.35", help="uniform shares of heads and units of the points")
    ap.add_argument("--random-batches", action="store_true",
                    help="random batches instead of the default length-grouped ones")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    import torch

    from toolchain.core.subnetwork import uniform_subnet
    from toolchain.recover import RecoverSettings, recover_point, teacher_logits
    from toolchain.run import load_run

    run = load_run(args.run)
    samples = [int(s) for s in args.samples.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-recovery-"))
    full_params = run.space.num_parameters(run.supernet.full())
    rows = []
    for n in samples:
        settings = RecoverSettings(samples=n, group_by_length=not args.random_batches)
        cache = work / f"samples-{n}"
        t = time.perf_counter()
        teacher_logits(run, settings, cache_dir=cache, progress=False)
        teacher_s = time.perf_counter() - t
        for ratio in ratios:
            subnet = uniform_subnet(run.supernet.dims, ratio)
            point = recover_point(run, subnet, settings, cache_dir=cache, progress=False)
            i = point.info
            rows.append((ratio, run.space.num_parameters(subnet) / full_params, n, i["score_before"],
                         i["score_after"], i["steps"], i["seconds"], teacher_s))
            print(f"ratio {ratio:.2f} ({rows[-1][1]:.0%} of the parameters), {n} texts: {i['metric']} "
                  f"{i['score_before']:.4f} -> {i['score_after']:.4f} ({i['steps']} steps, {i['seconds']:.0f} s; "
                  f"teacher {teacher_s:.0f} s)", flush=True)
    full = run.supernet.full()
    from toolchain.evaluation import score_model

    with torch.no_grad():
        unpruned = score_model(run.supernet.slice(full), run.encoded("validation"), run.spec)["score"]
    md = ["## Recovery: metric against training texts (`bench_recovery.py`)", "",
          f"`python benchmarks/bench_recovery.py --run <super-network> --samples {args.samples} --ratios "
          f"{args.ratios}" + (" --random-batches" if args.random_batches else "") + f"`. Machine: {machine()}. "
          f"Super-network: {run.settings.get('model') or 'all-MiniLM-L6-v2'} on "
          f"{run.data.describe()} ({run.settings.get('train', {}).get('strategy')}, init "
          f"{run.settings.get('init', 'pretrained')}); its full network scores {unpruned:.4f} ({run.spec.metric}, "
          f"dev, {len(run.data.load('validation'))} examples). Points: the same share of heads and FFN units in "
          "every layer. Recovery: KL to the full network's logits + labels (50/50), lr 1e-4, batch 32, one epoch "
          f"over the texts, {'random' if args.random_batches else 'length-grouped'} batches.", ""]
    md += markdown_table(["point (share)", "parameters", "texts", "before", "after", "change (points)", "steps",
                          "seconds", "teacher s"],
                         [[f"uniform {ratio:.2f}", f"{share:.0%}", n, f"{before:.4f}", f"{after:.4f}",
                           f"{100 * (after - before):+.1f}", steps, f"{secs:.0f}", f"{teacher_s:.0f}"]
                          for ratio, share, n, before, after, steps, secs, teacher_s in rows],
                         right=set(range(1, 9)))
    publish("bench_recovery", md, write=not args.no_docs)


if __name__ == "__main__":
    main()
