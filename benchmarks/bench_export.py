"""Export benchmark: the unpruned MiniLM and three pruned MEDIUM points, fp32 and int8, measured with ONNX Runtime.

    python benchmarks/bench_export.py                   # default model, untrained head: metric n/a
    python benchmarks/bench_export.py --run-dir RUN     # a trained super-network run: validation metric too

Per point: parameters, measured latency (the latency tables' meter, :func:`targets.meter.measure_isolated`: a fresh
interpreter, the point and the unpruned fp32 ONNX model alternating for ``--rounds`` rounds, so background load hits
both alike), speed-up over the unpruned fp32 model measured beside it, fp32 vs int8, measured memory, metric. The
same meter as the export's and the tables', rather than timing every session round-robin in this process.

Physical-limit check: a sliced model against a dense model built natively at the same shape. Heads cannot be matched
natively (a BERT config ties head size to hidden_size / num_attention_heads, so 6 heads of 32 dims at hidden 384 is
not expressible); the check therefore uses units-only + layer pruning: 12 heads, ``u`` FFN units, ``L`` layers,
sliced from the 6-layer model vs ``model_from_config(intermediate_size=u, num_hidden_layers=L)``. The latency ratio
should be within 10%.

Results go to docs/benchmarks.md between ``<!-- bench_export:start -->`` / ``<!-- bench_export:end -->``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import table_path, write_section

ROOT = Path(__file__).resolve().parents[1]

# Fixed MEDIUM sub-networks for the 6-layer x 12-head x 1536-unit MiniLM, aiming at ~75 %, ~50 %, ~33 % latency.
# Fractions of the model's heads / units per layer, so that they scale to another model of the family.
POINTS = {
    "medium-75": ([12, 10, 10, 8, 8, 6], [1536, 1280, 1152, 1024, 1024, 768]),
    "medium-50": ([8, 8, 6, 6, 4, 4], [1024, 896, 768, 640, 512, 512]),
    "medium-33": ([6, 6, 4, 4, 2, 0], [768, 640, 512, 384, 256, 256]),
}
REF_HEADS, REF_UNITS = 12, 1536


def scaled_subnet(heads, units, dims):
    from toolchain.core.subnetwork import SubNetwork

    n = dims.num_layers
    h = [round(x * dims.num_heads / REF_HEADS) for x in (heads + heads[-1:] * n)[:n]]
    u = [round(x * dims.intermediate_size / REF_UNITS) for x in (units + units[-1:] * n)[:n]]
    return SubNetwork(heads=tuple(h), units=tuple(u))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", help="trained nasprune run folder (super-network checkpoint) for the metric")
    ap.add_argument("--model", default=None, help="model (default: all-MiniLM-L6-v2); ignored with --run-dir")
    ap.add_argument("--out", default=None, help="where the export folders go (default: a temporary folder)")
    ap.add_argument("--target", default="cpu", help="target name (targets/*.toml); 'none' = CPU default session")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each point beside the unpruned fp32 model")
    ap.add_argument("--eval-samples", type=int, default=500, help="validation examples for the metric")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--tables", default=str(ROOT / "benchmarks" / "results"),
                    help="folder of latency tables (bench_latency.py writes them) for the predicted latency; the "
                         "target's cached table is used where none is there")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from toolchain.ship.export import export_point
    from toolchain.core.modeling import ModelDims, load_model, model_from_config
    from toolchain.onnx.build import build_onnx
    from toolchain.core.subnetwork import SubNetwork
    from toolchain.core.supernet import SuperNetwork
    from targets.meter import measure_isolated
    from toolchain.ship.verify import MetricData, meter_settings

    torch.set_num_threads(1)
    t_start = time.time()
    target = None
    if args.target != "none":
        try:
            from targets import load_target

            target = load_target(args.target)
            args.batch, args.seq_len = target.batch_size, target.sequence_length
        except Exception as e:  # noqa: BLE001
            print(f"target '{args.target}' unavailable ({e}); using the CPU default session", file=sys.stderr)

    metric_data, source = None, "default model, untrained classifier head (metric n/a)"
    if args.run_dir:
        from toolchain.run import load_run

        run = load_run(args.run_dir)
        supernet, tokenizer = run.supernet, run.tokenizer
        ds = run.data.load("validation")
        if args.eval_samples and args.eval_samples < len(ds):
            ds = ds.sample(args.eval_samples, 0)
        metric_data = MetricData.from_dataset(ds, tokenizer, max_length=args.seq_len)
        source = f"super-network of run {args.run_dir}, {len(ds)} validation examples ({metric_data.name})"
    else:
        model, tokenizer = load_model(args.model, 2)
        supernet = SuperNetwork(model)
    dims = ModelDims.from_config(supernet.model.config)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nasprune-bench-export-"))
    out.mkdir(parents=True, exist_ok=True)
    precisions = ["fp32"] + ([] if args.no_int8 else ["int8"])
    if target is not None:
        precisions = [p for p in precisions if p in target.precisions]

    subnets = {"unpruned": supernet.full()}
    subnets.update({k: scaled_subnet(h, u, dims) for k, (h, u) in POINTS.items()})
    results, paths = {}, {}
    for name, sub in subnets.items():
        for prec in precisions:
            key = f"{name}/{prec}"
            t0 = time.time()
            res = export_point(supernet, sub, tokenizer, out / name / prec, precision=prec, target=target,
                               batch=args.batch, seq_len=args.seq_len, metric_data=metric_data, reps=20, warmup=5,
                               overwrite=True)
            results[key] = res
            paths[key] = res.path / "model.onnx"
            print(f"exported {key}: {res.parameters / 1e6:.2f}M params, attention fused "
                  f"{res.info['onnx']['attention_found']}/{res.info['onnx']['attention_expected']}, "
                  f"max|delta| {res.info['verification']['max_abs_logit_delta']:.2e} ({time.time() - t0:.0f}s)",
                  flush=True)

    # physical limit: units-only + layer pruning, sliced vs natively built at the same shape
    L, u = max(1, dims.num_layers * 2 // 3), dims.intermediate_size // 2
    phys_sub = SubNetwork(heads=(dims.num_heads,) * L + (0,) * (dims.num_layers - L),
                          units=(u,) * L + (0,) * (dims.num_layers - L))
    cfg = copy.deepcopy(supernet.model.config)
    cfg.num_hidden_layers, cfg.intermediate_size = L, u
    # build_onnx gives the native model the explicit head counts that ORT's Attention fusion needs
    native = model_from_config(cfg).eval()
    sliced = supernet.slice(phys_sub)
    for name, m in (("phys/sliced", sliced), ("phys/native", native)):
        path = out / "physical" / name.split("/")[1] / "model.onnx"
        stats = build_onnx(m, path, "fp32", args.batch, args.seq_len, use_gpu=bool(target and target.uses_gpu))
        paths[name] = path
        print(f"built {name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, fused {stats}", flush=True)

    print(f"measuring: {args.rounds} rounds per model beside its reference, by the tables' meter", flush=True)
    settings = meter_settings(target, None, args.batch, args.seq_len)

    def beside(key, reference):  # the meter's median of the rounds, and the reference's, measured alternately
        r = measure_isolated(paths[key], settings, dims.vocab_size, rounds=args.rounds, reference=reference)
        return {"median_ms": r["latency_ms"], "p90_ms": r["p90_ms"], "reference_ms": r["reference_ms"]}

    lat = {key: beside(key, paths["unpruned/fp32"]) for key in results}
    lat["phys/sliced"] = beside("phys/sliced", paths["phys/native"])

    def table_for(prec):
        from latency_models.cache import find_table
        from latency_models.lookup_table import LatencyTable

        path = table_path(args.tables, dims, getattr(target, "name", "cpu"), prec)
        try:
            return LatencyTable.load(path) if path.is_file() else find_table(args.target, prec, dims)
        except Exception as e:  # noqa: BLE001 - the column is then n/a
            print(f"no latency table for {prec}: {e}", file=sys.stderr)
            return None

    tables = {prec: table_for(prec) for prec in precisions}
    rows = []
    for name, sub in subnets.items():
        for prec in precisions:
            key = f"{name}/{prec}"
            r = results[key]
            m = r.metric
            rows.append({
                "point": name, "precision": prec, "params_m": r.parameters / 1e6,
                "heads": list(sub.heads), "units": list(sub.units),
                "latency_ms": lat[key]["median_ms"], "p90_ms": lat[key]["p90_ms"],
                "predicted_ms": tables[prec].predict_latency(sub) if tables[prec] is not None else None,
                "speedup": lat[key]["reference_ms"] / lat[key]["median_ms"], "memory_mb": r.measured_memory_mb,
                "predicted_mb": tables[prec].predict_memory(sub) if tables[prec] is not None else None,
                "metric": None if m is None else m["score"],
                "max_delta": r.info["verification"]["max_abs_logit_delta"],
                "attention": f"{r.info['onnx']['attention_found']}/{r.info['onnx']['attention_expected']}",
            })
    ratio = lat["phys/sliced"]["median_ms"] / lat["phys/sliced"]["reference_ms"]
    fp = (target.fingerprint("fp32") if target is not None else {})
    summary = {
        "rows": rows, "physical": {"layers": L, "heads": dims.num_heads, "units": u,
                                   "sliced_ms": lat["phys/sliced"]["median_ms"],
                                   "native_ms": lat["phys/sliced"]["reference_ms"], "ratio": ratio,
                                   "within_10pct": abs(ratio - 1) <= 0.10},
        "settings": {"batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
                     "target": getattr(target, "name", "cpu-default"), "threads": fp.get("threads"),
                     "cpu": fp.get("cpu_model"), "onnxruntime": fp.get("onnxruntime"), "source": source},
        "wall_s": time.time() - t_start, "out": str(out), "load_average": list(os.getloadavg()),
    }
    (out / "bench_export.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [
        "## Export: pruned points, fp32 vs int8 (`benchmarks/bench_export.py`)",
        "",
        f"Model: {dims.model_type}, {dims.num_layers} layers x {dims.num_heads} heads x {dims.intermediate_size} FFN "
        f"units; {source}. Target `{summary['settings']['target']}` ({summary['settings']['cpu']}, "
        f"{summary['settings']['threads']} intra-op threads, ONNX Runtime {summary['settings']['onnxruntime']}), "
        f"batch {args.batch}, sequence length {args.seq_len}. Latency: the latency tables' meter in a fresh "
        f"interpreter, each point alternating with the unpruned fp32 ONNX model for {args.rounds} rounds (median of "
        f"the rounds; p90 of the first); speed-up over the unpruned fp32 model measured beside it. Memory (MB = 10^6 "
        f"bytes): peak RSS while serving minus RSS before the session, in a fresh process "
        f"(`targets.meter.measure`, the meter of the latency tables); predicted: the table's `predict_memory`. "
        f"max abs delta: ONNX vs sliced torch logits (fp32 must be <= 1e-4). Predicted: the latency table of "
        f"`benchmarks/bench_latency.py` for the target and precision.",
        "",
        "| point | heads / layer | FFN units / layer | params (M) | precision | predicted ms | latency ms (p90) | "
        "speed-up | predicted MB | memory MB | metric | max abs delta | Attention fused |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        metric = "n/a" if r["metric"] is None else f"{r['metric']:.4f}"
        mem = "n/a" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        pred_mem = "n/a" if r["predicted_mb"] is None else f"{r['predicted_mb']:.0f}"
        lines.append(
            f"| {r['point']} | {','.join(map(str, r['heads']))} | {','.join(map(str, r['units']))} | "
            f"{r['params_m']:.2f} | {r['precision']} | "
            f"{'n/a' if r['predicted_ms'] is None else format(r['predicted_ms'], '.2f')} | "
            f"{r['latency_ms']:.2f} ({r['p90_ms']:.2f}) | "
            f"{r['speedup']:.2f}x | {pred_mem} | {mem} | {metric} | {r['max_delta']:.1e} | {r['attention']} |"
        )
    p = summary["physical"]
    lines += [
        "",
        f"Physical limit (units-only + layer pruning, since a BERT config cannot express {dims.head_size}-dim heads "
        f"with fewer than {dims.num_heads} heads at hidden size {dims.hidden_size}): {L} layers x {dims.num_heads} "
        f"heads x {u} units, sliced from the full model: {p['sliced_ms']:.2f} ms; the same shape built natively "
        f"(`model_from_config`, random weights, exported the same way): {p['native_ms']:.2f} ms; ratio {ratio:.3f} "
        f"({'within' if p['within_10pct'] else 'NOT within'} 10 %).",
        "",
        f"Benchmark wall time {summary['wall_s']:.0f} s; load average at the end "
        f"{'/'.join(f'{x:.1f}' for x in summary['load_average'])} (1/5/15 min) on {os.cpu_count()} logical CPUs — "
        f"absolute latencies include contention from other processes; the side-by-side ratios are the robust part.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        write_section("bench_export", text)
        print(f"\nwrote {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
