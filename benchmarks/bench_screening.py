"""Choosing among a point and its twins after part of their recovery (issue: accurate at speed, in the time).

Before a point of the search is exported, it and its twins (:mod:`toolchain.twins`) are recovered and the best on the
validation set is exported. Recovering every candidate to the end costs three recoveries a point; ranking them after
a share of their recovery (:func:`toolchain.recover.screen_point`) and recovering only the best to the end costs
``3 x share + (1 - share)``. This benchmark takes compiles that recovered every candidate to the end (their points'
``extra.uniform_twin`` holds each one's score after recovery) and asks, for each share, whether the candidate that
leads after that share is the one that leads at the end, and how much is lost (*regret*: the best final score minus
the final score of the one the share picks) when it is not.

    python benchmarks/bench_screening.py --compile OUT [--compile OUT2 ...] [--shares 0.125,0.25,0.5]
        [--cache DIR] [--section NAME] [--no-docs]

``OUT``: a compile's output folder (``run.json`` names its super-network). Screenings go to ``--cache`` (default: the
super-network's own cache), where a rerun finds them (its ``cached`` column says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import docs_arguments, machine, markdown_table, publish, section_name  # noqa: E402


def groups(out: Path) -> list[dict]:
    """The candidates of each point of a compile that were all recovered to the end: ``{name: (subnet, final)}``."""
    from toolchain.core.subnetwork import SubNetwork

    front = {r["key"]: r for r in json.loads((out / "pareto.json").read_text())["pareto"]}
    seen, found = set(), []
    for f in sorted(out.glob("*/*/nasprune.json")):
        note = (json.loads(f.read_text()).get("extra") or {}).get("uniform_twin")
        if not note or note["point"] in seen:
            continue
        seen.add(note["point"])
        names = [n for n in ("point", "twin", "fisher") if f"{n}_score_after_recovery" in note]
        if len(names) < 2 or note["point"] not in front:
            continue  # screened by the compile already (losers not recovered to the end), or no twin
        subnets = {"point": SubNetwork.from_dict(front[note["point"]]["subnet"]),
                   **{n: SubNetwork.from_dict(note[f"{n}_subnet"]) for n in names if n != "point"}}
        found.append({"point": note["point"], "metric": note["metric"],
                      "candidates": {n: (subnets[n], note[f"{n}_score_after_recovery"]) for n in names}})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="append", required=True, help="a compile's output folder (repeatable)")
    ap.add_argument("--shares", default="0.125,0.25,0.5", help="shares of the recovery's steps to rank after")
    ap.add_argument("--cache", help="where the screenings go (default: the super-network's cache)")
    docs_arguments(ap, "bench_screening")
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]

    from toolchain.recover import RecoverSettings, drop_checkpoint, screen_point
    from toolchain.run import load_run

    rows, summary, cached, total = [], {s: [] for s in shares}, 0, 0
    for out in map(Path, args.compile):
        run_info = json.loads((out / "run.json").read_text())
        run = load_run(Path(run_info["supernet_dir"]).parent)
        task = run.data.describe()
        cache = Path(args.cache) / Path(run_info["supernet_dir"]).parent.name if args.cache else None
        for g in groups(out):
            final = {n: score for n, (_, score) in g["candidates"].items()}
            best = max(final, key=final.get)
            row = [task, g["point"], g["metric"], ", ".join(f"{n} {v:.4f}" for n, v in final.items())]
            for share in shares:
                settings = replace(RecoverSettings(), screen=share)
                scored = {n: screen_point(run, s, settings, cache_dir=cache, progress=False)
                          for n, (s, _) in g["candidates"].items()}
                cached += sum(r["cached"] for r in scored.values())
                total += len(scored)
                pick = max(scored, key=lambda n: scored[n]["score"])  # the point on a tie, as the compile does
                regret = final[best] - final[pick]
                summary[share].append(regret)
                step = next(iter(scored.values()))
                scores = ", ".join(f"{scored[n]['score']:.3f}" for n in scored)
                row.append(f"{pick} ({scores}; step {step['step']}/{step['total_steps']})"
                           + ("" if pick == best else f" -{regret:.4f}"))
            for s, _ in g["candidates"].values():
                drop_checkpoint(run, s, RecoverSettings(), cache_dir=cache)
            rows.append(row)
            print(" | ".join(row), flush=True)

    md = ["## Ranking a point and its twins after part of their recovery (`bench_screening.py`)", "",
          f"`python benchmarks/bench_screening.py {' '.join('--compile ' + c for c in args.compile)} --shares "
          f"{args.shares}`. Machine: {machine()}. Each compile recovered every candidate to the end (default recovery "
          "settings); for each share of the recovery's steps, the candidate that leads on the validation set after it "
          "(the scores after it in the order of the final column; `-x`: its final score is x below the best's). "
          f"{cached} of {total} screenings were found cached.", ""]
    md += markdown_table(["task", "point", "metric", "after the whole recovery",
                          *(f"leader after {s:g}" for s in shares)], rows)
    md += ["", "| share | picks the final leader | mean regret | worst regret | recoveries per point of 3 candidates |",
           "| ---: | ---: | ---: | ---: | ---: |"]
    for s in shares:
        r = summary[s]
        md.append(f"| {s:g} | {sum(x == 0 for x in r)} of {len(r)} | {sum(r) / max(1, len(r)):.4f} | "
                  f"{max(r, default=0):.4f} | {3 * s + 1 - s:.2f} |")
    publish(section_name("bench_screening", args.section), md, write=not args.no_docs)


if __name__ == "__main__":
    main()
