"""Recovery settings side by side, on the points a compile searched (issue: accurate at speed).

For sub-networks of a compile's front (``pareto.json`` of its output folder, chosen by key), the task metric on the
validation (dev) set with the shared weights and after recovery (:mod:`toolchain.recover`) with each of several
settings, and the seconds each recovery took. Used to choose the default: random batches of 6000 texts against
length-grouped batches of 12000, which cost about the same.

    python benchmarks/bench_recovery_settings.py --run <cache>/supernets/<key> --front <out>/pareto.json \\
        --keys 74847e8a9fa9,e65f92fa9eb1,47e30e1ed3dd \\
        --settings '{"samples": 6000, "group_by_length": false}' '{"samples": 12000, "group_by_length": true}'

Every setting recovers into a fresh temporary cache (nothing reused from the compile); recovery is deterministic
for given settings (seeded order and initialisation), so a rerun gives the same metrics. Each recovered point is
also scored on the two halves of the dev set (a seeded split, ``--split-seed``): a setting is chosen on one half
and checked on the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (dev_halves, front_arguments, front_records, machine, markdown_table, publish,  # noqa: E402
                    section_argument, section_name)
from toolchain.heldout import unused_training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    front_arguments(ap)
    ap.add_argument("--settings", nargs="+", required=True, help="RecoverSettings fields as JSON, one per setting")
    ap.add_argument("--heldout", type=int, default=0, help="also score each recovered point on this many training "
                    "examples that neither the super-network nor any setting's recovery used (0: dev only)")
    ap.add_argument("--heldout-min-words", type=int, default=15, help="the held-out examples' least length in words")
    section_argument(ap, "bench_recovery_settings")
    args = ap.parse_args()

    from toolchain.core.subnetwork import SubNetwork
    from toolchain.ship.verify import predict_torch
    from toolchain.recover import RecoverSettings, recover_point, teacher_logits
    from toolchain.run import load_run

    run = load_run(args.run)
    keys = args.keys.split(",")
    records = front_records(args.front, keys)
    variants = [json.loads(s) for s in args.settings]
    full_params = run.space.num_parameters(run.supernet.full())
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-recovery-settings-"))
    dev, split_scores = dev_halves(run, args.split_seed)

    def half_scores(model) -> tuple[float, float]:
        return split_scores(predict_torch(model, dev.inputs))[:2]

    held = None
    if args.heldout:
        from toolchain.ship.verify import MetricData

        examples, n_unused = unused_training(run, [RecoverSettings(**kw) for kw in variants], args.heldout,
                                             args.split_seed, args.heldout_min_words)
        held = MetricData.from_dataset(examples, run.tokenizer, run.data.max_length)

    def held_score(model) -> float | None:
        return None if held is None else float(held.metric(predict_torch(model, held.inputs), held.labels)["score"])

    results: dict[tuple[int, str], dict] = {}
    teacher_s = []
    for v, kw in enumerate(variants):
        settings = RecoverSettings(**kw)
        cache = work / f"setting-{v}"
        t = time.perf_counter()
        teacher_logits(run, settings, cache_dir=cache, progress=False)
        teacher_s.append(time.perf_counter() - t)
        for key in keys:
            subnet = SubNetwork(**records[key]["subnet"])
            point = recover_point(run, subnet, settings, cache_dir=cache, progress=False)
            info = results[v, key] = {**point.info, "halves": half_scores(point.model), "held": held_score(point.model)}
            print(f"{json.dumps(kw)} {key}: {info['score_before']:.4f} -> {info['score_after']:.4f} "
                  f"({info['steps']} steps, {info['seconds']:.0f} s)", flush=True)

    def label(kw: dict) -> str:
        s = RecoverSettings(**kw)
        rest = "".join(f", {k} {v}" for k, v in kw.items() if k not in ("samples", "group_by_length"))
        return f"{s.samples or 'all'} texts, {'grouped' if s.group_by_length else 'random'}{rest}"

    head = ["point", "parameters", "predicted ms", "before"]
    for kw in variants:
        head += [f"after: {label(kw)}", "half A / B", *(["held-out"] if held else []), "s"]
    rows = []
    for key in keys:
        r = records[key]
        row = [key, f"{r['params'] / full_params:.0%}", f"{r['latency']:.2f}", f"{results[0, key]['score_before']:.4f}"]
        for v in range(len(variants)):
            i = results[v, key]
            row += [f"{i['score_after']:.4f} ({100 * (i['score_after'] - i['score_before']):+.1f})",
                    " / ".join(f"{h:.4f}" for h in i["halves"]), *([f"{i['held']:.4f}"] if held else []),
                    f"{i['seconds']:.0f}"]
        rows.append(row)
    means = ["mean change (halves: mean metric)", "", "", ""]
    for v in range(len(variants)):
        gain = sum(results[v, k]["score_after"] - results[v, k]["score_before"] for k in keys) / len(keys)
        secs = sum(results[v, k]["seconds"] for k in keys) / len(keys)
        halves_mean = [sum(results[v, k]["halves"][h] for k in keys) / len(keys) for h in (0, 1)]
        held_mean = [f"{sum(results[v, k]['held'] for k in keys) / len(keys):.4f}"] if held else []
        means += [f"{100 * gain:+.1f}", " / ".join(f"{h:.4f}" for h in halves_mean), *held_mean, f"{secs:.0f}"]
    rows.append(means)
    settings_text = "; ".join(f"{label(kw)}: teacher logits {s:.0f} s" for kw, s in zip(variants, teacher_s))
    md = ["## Recovery settings side by side (`bench_recovery_settings.py`)", "",
          f"`python benchmarks/bench_recovery_settings.py --run <super-network> --front <pareto.json> --keys "
          f"{args.keys} --settings " + " ".join(f"'{s}'" for s in args.settings) + f"`. Machine: {machine()}. "
          f"Super-network: {run.data.describe()}, {run.settings.get('train', {}).get('strategy')}; points: sub-networks of "
          f"a default compile's front (predicted fp32 latency at the target's length). Metric: {run.spec.metric} on "
          f"the dev set ({len(dev)} examples), before (shared weights) and after recovery "
          f"(KL to the full network's logits + labels, 50/50, lr 1e-4, batch 32, one epoch); s: seconds of the "
          f"recovery, one run each on a shared machine; half A / B: the recovered point on the two halves of the dev set "
          f"(split seed {args.split_seed}). {settings_text}."
          + (f" Held-out: {len(held)} of the {n_unused} training examples of at least {args.heldout_min_words} "
             f"words that neither the super-network nor any setting's recovery used (`--heldout {args.heldout}`)."
             if held else ""), ""]
    md += markdown_table(head, rows, right=set(range(1, len(head))))
    publish(section_name("bench_recovery_settings", args.section), md, write=not args.no_docs)


if __name__ == "__main__":
    main()
