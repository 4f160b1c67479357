"""Graph form benchmark: the residual connections as ``SkipLayerNormalization`` (ONNX Runtime's fused operator, the
``fused`` form) against ``Sum`` + ``LayerNormalization`` (the ``residual-sum`` form, what nasprune exports for a CPU,
:func:`toolchain.onnx.build.graph_form`), for the unpruned model and the MEDIUM points of ``bench_export.py``, in
fp32 and int8.

    python benchmarks/bench_graph_form.py            # default model; --target, --rounds, --lengths

Each model is built in both forms (:func:`toolchain.onnx.build.build_onnx` with ``form=``) and the two are measured
side by side by the latency tables' meter (:func:`targets.meter.measure_isolated`: a fresh interpreter, the two
forms alternating for ``--rounds`` rounds, then one round at each of ``--lengths``), so that both see the same
machine: the ratio of the two medians is the robust figure. The last column says which operators a plain ONNX
Runtime session (default options) runs for the residual connections of the ``residual-sum`` form: it must not fuse
them back. Results go to docs/benchmarks.md between ``<!-- bench_graph_form:start -->`` / ``<!-- bench_graph_form:end
-->``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from bench_export import POINTS, scaled_subnet
from common import machine, markdown_table, publish, session_ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model (default: all-MiniLM-L6-v2)")
    ap.add_argument("--target", default="cpu", help="target name or TOML (its threads, batch and length)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds at the target's length")
    ap.add_argument("--lengths", default="32,256", help="other sequence lengths, one round each")
    ap.add_argument("--out", default=None, help="where the graphs go (default: a temporary folder)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from targets import load_target
    from targets.meter import measure_isolated
    from toolchain.core.modeling import ModelDims, load_model
    from toolchain.core.supernet import SuperNetwork
    from toolchain.onnx.build import CPU_GRAPHS, GPU_GRAPHS, build_onnx
    from toolchain.ship.verify import meter_settings

    torch.set_num_threads(1)
    started = time.time()
    target = load_target(args.target)
    settings = meter_settings(target, None, target.batch_size, target.sequence_length)
    lengths = [int(n) for n in args.lengths.split(",") if n]
    model, _ = load_model(args.model, 2)
    supernet = SuperNetwork(model)
    dims = ModelDims.from_config(model.config)
    out = Path(args.out or tempfile.mkdtemp(prefix="nasprune-bench-graph-form-"))
    subnets = {"unpruned": supernet.full(), **{k: scaled_subnet(h, u, dims) for k, (h, u) in POINTS.items()}}
    precisions = [p for p in ("fp32", "int8") if p in target.precisions]

    results = {}
    for name, sub in subnets.items():
        sliced = supernet.slice(sub).eval()
        for precision in precisions:
            paths = {}
            for form in (GPU_GRAPHS, CPU_GRAPHS):
                paths[form] = out / f"{name}-{precision}-{form}.onnx"
                build_onnx(sliced, paths[form], precision, target.batch_size, target.sequence_length, form=form)
            r = measure_isolated(paths[CPU_GRAPHS], settings, dims.vocab_size, rounds=args.rounds,
                                 reference=paths[GPU_GRAPHS], lengths=lengths)
            ops = session_ops(paths[CPU_GRAPHS])
            results[name, precision] = {"fused_ms": r["reference_ms"], "sum_ms": r["latency_ms"],
                                        "by_length": r.get("by_length", {}),
                                        "session": {k: ops[k] for k in ("SkipLayerNormalization", "Sum",
                                                                        "LayerNormalization") if k in ops}}
            print(f"{name} {precision}: fused {r['reference_ms']:.2f} ms, residual-sum {r['latency_ms']:.2f} ms "
                  f"({time.time() - started:.0f} s)", flush=True)

    base_fused, base_sum = results["unpruned", "fp32"]["fused_ms"], results["unpruned", "fp32"]["sum_ms"]
    rows = []
    for (name, precision), r in results.items():
        at = "; ".join(f"{n}: {v['reference_ms'] / v['latency_ms']:.2f}x" for n, v in r["by_length"].items())
        rows.append([name, precision, f"{r['fused_ms']:.2f}", f"{r['sum_ms']:.2f}",
                     f"{r['fused_ms'] / r['sum_ms']:.2f}x", at or "n/a",
                     f"{base_fused / r['fused_ms']:.2f}x", f"{base_sum / r['sum_ms']:.2f}x",
                     ", ".join(f"{k} {v}" for k, v in r["session"].items())])
    lines = [
        "## Graph form: SkipLayerNormalization or Sum + LayerNormalization (`benchmarks/bench_graph_form.py`)",
        "",
        f"Model {dims.model_type}, {dims.num_layers} layers x {dims.num_heads} heads x {dims.intermediate_size} FFN "
        f"units (weights as loaded; latency does not depend on them); target `{target.name}` "
        f"({target.fingerprint('fp32').get('threads')} intra-op threads), batch {target.batch_size}, length "
        f"{target.sequence_length}; {machine()}. Each model built in both forms and measured by the tables' meter, "
        f"the two forms alternating for {args.rounds} rounds (medians), then one round at each other length "
        f"(the ratio there). Speed-ups are over the unpruned fp32 model of the same form.",
        "",
        *markdown_table(["point", "precision", "fused ms", "residual-sum ms", "fused / residual-sum",
                         "at other lengths", "speed-up, fused", "speed-up, residual-sum",
                         "plain ORT session runs (residual-sum)"], rows, right={2, 3, 4, 6, 7}),
        "",
        f"Wall time {time.time() - started:.0f} s; load average at the end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}.",
    ]
    publish("bench_graph_form", lines, write=not args.no_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
