"""Int8 quantization variants side by side, on the recovered points of a compile (issue: accurate at speed).

Dynamic int8 (ONNX Runtime's ``quantize_dynamic``) costs a pruned, recovered sub-network more accuracy than the
unpruned network (-1.4 points against -0.2 in one default compile). For the unpruned network and sub-networks of a
compile's front (``pareto.json``, chosen by key), each recovered as compile recovers it (from the compile's cache
when it is there) and exported in fp32 as compile exports it, this quantizes the fp32 model with each variant and
gives its task metric on the two halves of the dev set (a seeded split: choose on one half, check on the other) and
its latency beside the unpruned fp32 model (speed-up, median of rounds):

- ``per-tensor``: one weight scale per tensor (what compile shipped before per-channel became the default);
- ``per-channel``: one weight scale per output column (``toolchain.onnx.build.quantize_int8``'s default);
- ``ffn-out-fp32``: per tensor, with the FFN's second MatMul (fed by the GELU, whose outputs have the widest range)
  kept in float;
- ``attention-fp32``: per tensor, with the fused Attention (its Q/K/V projection) kept in float.

    python benchmarks/bench_quantization.py --run <cache>/supernets/<key> --front <out>/pareto.json \\
        --keys bafd1f2308d0,ec338dd51942

Recovery is deterministic for given settings, so a rerun on the same super-network gives the same metrics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dev_halves, front_arguments, front_records, machine, markdown_table, publish  # noqa: E402

GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")


def ffn_output_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose input is a GELU's output (each layer's FFN output projection)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and producer.get(n.input[0]) in GELU_OPS]


def variants(fp32: Path) -> dict[str, dict]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry  # the operators quantize_dynamic quantizes

    return {"per-tensor": {"per_channel": False}, "per-channel": {"per_channel": True},
            "ffn-out-fp32": {"per_channel": False, "exclude": ffn_output_matmuls(fp32)},
            "attention-fp32": {"per_channel": False, "op_types": [o for o in IntegerOpsRegistry if o != "Attention"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    front_arguments(ap)
    ap.add_argument("--target", default="cpu", help="target whose session settings time the models (default: cpu)")
    args = ap.parse_args()

    from latency_models.grid import as_target
    from targets.meter import measure, measure_beside
    from toolchain.core.subnetwork import SubNetwork
    from toolchain.onnx.build import build_onnx, quantize_int8
    from toolchain.recover import RecoverSettings, recover_point
    from toolchain.ship.verify import default_session, meter_settings, predict_onnx

    run = load_run_or_exit(args.run)
    keys = args.keys.split(",")
    records = front_records(args.front, keys)
    target = as_target(args.target)
    settings = meter_settings(target)
    vocab = run.supernet.model.config.vocab_size
    dev, split_scores = dev_halves(run, args.split_seed)

    def scores(path: Path) -> tuple[float, float, float]:
        return split_scores(predict_onnx(default_session(path), dev.inputs))

    points = [("unpruned", run.supernet.full())] + [(k, SubNetwork(**records[k]["subnet"])) for k in keys]
    work = Path(tempfile.mkdtemp(prefix="nasprune-bench-quantization-"))
    rows, deltas = [], {}
    reference = work / "unpruned-fp32.onnx"
    for name, subnet in points:
        point = recover_point(run, subnet, RecoverSettings(seed=0), progress=False)  # compile's default recovery
        fp32 = work / f"{name}-fp32.onnx"
        build_onnx(point.model, fp32, "fp32")
        models = {"fp32": fp32}
        for v, kw in variants(fp32).items():
            models[v] = quantize_int8(fp32, work / f"{name}-{v}.onnx", **kw)
        for label, path in models.items():
            a, b, full = scores(path)
            m = measure_beside(lambda p: measure(p, settings, vocab), path, None if path == reference else reference)
            speedup = m["reference_ms"] / m["latency_ms"]
            if label == "fp32":
                base = (a, b, full)
            else:
                deltas.setdefault(label, []).append(tuple(100 * (x - y) for x, y in zip((a, b, full), base)))
            rows.append([name, label, f"{a:.4f}", f"{b:.4f}", f"{full:.4f}",
                         "" if label == "fp32" else f"{100 * (full - base[2]):+.1f}", f"{m['latency_ms']:.2f}",
                         f"{speedup:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    head = ["point", "model", "dev half A", "dev half B", "dev", "int8 cost (pt)", "ms", "speed-up"]
    summary = ["| variant | mean int8 cost, half A (pt) | half B | whole dev | worst point (whole dev) |",
               "| --- | ---: | ---: | ---: | ---: |"]
    for v, d in deltas.items():
        summary.append(f"| {v} | {statistics.mean(x[0] for x in d):+.2f} | {statistics.mean(x[1] for x in d):+.2f} "
                       f"| {statistics.mean(x[2] for x in d):+.2f} | {min(x[2] for x in d):+.1f} |")
    md = ["## Int8 quantization variants (`bench_quantization.py`)", "",
          f"`python benchmarks/bench_quantization.py --run <super-network> --front <pareto.json> --keys {args.keys}`. "
          f"Machine: {machine()}. Super-network: {run.data.describe()}; points: the unpruned network and sub-networks of a "
          f"default compile's front, each recovered as compile recovers it and exported in fp32 as compile does; "
          f"metric: {run.spec.metric} on the dev set ({len(dev)} examples) and on its two halves (split seed "
          f"{args.split_seed}); ms: median of 3 rounds, each beside the unpruned fp32 model (speed-up: its median "
          f"over the model's), {args.target} target settings; one run on a shared machine.", ""]
    md += markdown_table(head, rows, right=set(range(2, len(head)))) + ["", *summary]
    publish("bench_quantization", md, write=not args.no_docs)


def load_run_or_exit(folder: str):
    from toolchain.run import load_run

    try:
        return load_run(folder)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load the super-network in {folder}: {e}") from None


if __name__ == "__main__":
    main()
