"""Wall time of `nasprune-compile` on this machine (issue: nasprune-compile).

Runs, in one fresh cache (so the first compile includes profiling and training):

1. the README's main command with the default preset: `nasprune-compile --target cpu --max-latency 20ms`
2. a recompile with another budget, reusing the cached latency table and super-network
3. the quick preset in another fresh cache

and checks that every shipped point's *measured* latency is under its budget, and how much each shipped point loses
on training examples the compile never used (``bench_heldout.py``) beside the dev loss it reported.

    python benchmarks/bench_compile.py [--budgets 20ms,10ms] [--skip-quick] [--extra "--sequence-length data"]
                                       [--cache DIR]

For each compile it also prints how close the latency table's predictions came to the export's drift-corrected
measurements (every exported point with a prediction, and the unpruned reference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import data_dir, machine, write_section


def compile_once(args: list[str], cache: Path, cwd: Path) -> tuple[float, dict, str]:
    env = {**os.environ, "NASPRUNE_CACHE": str(cache), "NASPRUNE_DATA_DIR": data_dir()}
    t = time.time()
    exe = Path(sys.executable).parent / "nasprune-compile"  # the venv's entry point, also when not activated
    proc = subprocess.run([str(exe) if exe.exists() else "nasprune-compile", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode != 0:
        sys.exit(f"nasprune-compile {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    out = next(line.split(" to ", 1)[1].split(" (")[0] for line in proc.stdout.splitlines() if line.startswith("shipped"))
    manifest = json.loads((cwd / out / "manifest.json").read_text())
    manifest["output"] = str(cwd / out)
    return wall, manifest, proc.stdout


def prediction_check(manifest: dict) -> str:
    """Predicted latency vs the export's drift-corrected measurement, for every exported point a table predicts
    (every precision the search had a table of) and the unpruned reference: how many within +-5 % and +-10 %."""
    rows = [(p["predicted_latency_ms"], p["measured_latency_drift_corrected_ms"]) for p in manifest["points"]]
    ref = Path(manifest["output"]) / "reference" / "unpruned" / "nasprune.json"
    if ref.is_file():
        info = json.loads(ref.read_text())
        rows.append(((info.get("predicted") or {}).get("latency_ms"),
                     (info.get("measured") or {}).get("latency_drift_corrected_ms")))
    errs = [m / p - 1 for p, m in rows if p and m]
    if not errs:
        return "no drift-corrected figures (the table was not measured here at this length)"
    return (f"predicted vs drift-corrected measured: {sum(abs(e) <= 0.05 for e in errs)} of {len(errs)} within "
            f"±5 %, {sum(abs(e) <= 0.10 for e in errs)} within ±10 % (reference included; errors "
            + ", ".join(f"{100 * e:+.1f}" for e in sorted(errs, key=abs)) + " %)")


def check(manifest: dict, budget_ms: float) -> str:
    """Shipped points against the budget, and each one's measured speed-up and metric change (points) against the
    unpruned fp32 model exported the same way in the same run, on dev and on what the compile chose on (dev and
    unused training examples, toolchain.heldout)."""
    shipped = [p for p in manifest["points"] if p["feasible"]]
    ok = all(p["measured_latency_ms"] <= budget_ms for p in shipped)
    ref = manifest["settings"]["unpruned"]
    dev = ref.get("metric_dev", ref["metric"])
    each = ", ".join(f"{p['measured_latency_ms']:.1f} ms {p['precision']} "
                     f"({ref['measured_latency_ms'] / p['measured_latency_ms']:.2f}x, "
                     f"{100 * (p.get('metric_dev', p['metric']) - dev):+.1f} pt dev, "
                     f"{100 * (p['metric'] - ref['metric']):+.1f} chosen on)" for p in shipped)
    return (f"{len(shipped)} shipped: {each}; {'all under' if ok else 'NOT all under'} {budget_ms:g} ms; "
            + prediction_check(manifest))


def heldout_check(manifest: dict, n: int = 2000) -> str:
    """Each shipped point's loss against the unpruned model on ``n`` training examples the compile never used
    (``bench_heldout.py``: plain onnxruntime), beside the dev loss the compile reported."""
    from bench_heldout import score_compile

    try:
        scored, about = score_compile(Path(manifest["output"]), n, seed=1)
    except ValueError as e:  # too few training examples left unused (a small task)
        return f"held-out: {e}"
    losses = ", ".join(f"{100 * p['held_loss']:+.1f}" for p in scored if p["id"] != "unpruned")
    return f"held-out loss on {about['n']} unused training examples (bench_heldout): {losses} pt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="20ms,10ms", help="first compile, then recompile budgets")
    ap.add_argument("--preset", default="default", help="preset of the two compiles (quick|default|paper)")
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--keep", default=None, help="copy the first run folder here (README figures)")
    ap.add_argument("--extra", default="", help="more options for every compile, e.g. \"--sequence-length data\"")
    ap.add_argument("--cache", default=None, help="use this nasprune cache (default: a fresh one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-compile-"))
    budgets = args.budgets.split(",")
    rows, outputs = [], {}
    cache = Path(args.cache) if args.cache else work / "cache"
    for i, budget in enumerate(budgets):
        wall, manifest, stdout = compile_once(["--target", "cpu", "--max-latency", budget, "--preset", args.preset,
                                               *args.extra.split()], cache, work)
        label = ("first compile (profile + train + search + export)" if not args.cache else
                 "first compile (given cache)") if i == 0 else "recompile, new budget (caches reused)"
        ms = float(budget.rstrip("ms"))
        rows.append((f"`--max-latency {budget} --preset {args.preset}`: {label}", wall, manifest["timings"],
                     check(manifest, ms) + "; " + heldout_check(manifest)))
        outputs[budget] = stdout
        print(f"{label}: {wall:.0f} s; {rows[-1][3]}", flush=True)
        if i == 0 and args.keep:
            src = Path(manifest["output"])
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(src, args.keep)
    if not args.skip_quick and args.preset != "quick":
        wall, manifest, stdout = compile_once(["--target", "cpu", "--max-latency", budgets[0], "--preset", "quick",
                                               "-o", "quick-run"], work / "cache-quick", work)
        rows.append((f"`--max-latency {budgets[0]} --preset quick`, fresh cache", wall, manifest["timings"],
                     check(manifest, float(budgets[0].rstrip("ms"))) + "; " + heldout_check(manifest)))
        print(f"quick preset: {wall:.0f} s; {rows[-1][3]}", flush=True)
    extra = f' --extra "{args.extra}"' if args.extra else ""
    md = ["## nasprune-compile wall time", "",
          f"`python benchmarks/bench_compile.py --budgets {args.budgets} --preset {args.preset}"
          f"{' --skip-quick' if args.skip_quick else ''}{extra}{' --cache DIR' if args.cache else ''}`. "
          f"Machine: {machine()}. Default model "
          "(all-MiniLM-L6-v2), SST-2, target `cpu` (batch 1, sequence 128 unless --extra says otherwise).", "",
          "| run | wall time (s) | profile | train | search | validate | export | shipped points |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, wall, t, verdict in rows:
        md.append(f"| {name} | {wall:.0f} | {t.get('profile_s', 0):.0f} | {t.get('train_s', 0):.0f} | "
                  f"{t.get('search_s', 0):.0f} | {t.get('validate_s', 0):.0f} | {t.get('export_s', 0):.0f} | {verdict} |")
    first = outputs[budgets[0]].strip()
    start = first.find("latency table ")  # from the first table's summary (a compile may profile one per precision)
    md += ["", "Output of the first compile:", "", "```", first[start if start >= 0 else -3000:], "```"]
    # a compile with other options (--extra) keeps its own section beside the default one
    slug = "".join(c if c.isalnum() else "-" for c in args.extra.strip().lstrip("-")).strip("-")
    write_section("bench_compile" + (f"-{slug}" if slug else ""), "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
