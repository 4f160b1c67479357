"""Every structured-pruning method given the same recovery, on one super-network (issue: accurate at speed).

At each latency budget (a share of the unpruned fp32 model's predicted latency), the sub-network each method would
ship, sliced from the same super-network and recovered the same way (:func:`toolchain.recover.recover_point`,
default settings: distilled from the super-network's full network), then scored in fp32 (torch) and int8 (the
ONNX model built as the export builds it, ONNX Runtime):

* **NAS** (nasprune): of the compile's front (``pareto.json``) under the budget, the point with the best
  shared-weight score on dev half A (the choice is made on half A; half B checks it);
* **retraining-free pruning** (Kwon et al., :mod:`toolchain.rfp`): the mask its Fisher-information search and
  per-layer rearrangement choose on the super-network's full network under the budget (mask gradients on
  ``--rfp-samples`` training examples, as ``--method rfp`` takes them); its least-squares rescaling is left out: the
  recovery trains the kept weights instead (``bench_baselines.py`` compares the rescaled masks without recovery);
* **uniform ratio**: the same share of heads and FFN units in every layer, the largest under the budget;
* **layer dropping**: the first k layers at full width, the largest under the budget.

The unpruned network itself is recovered the same way and is the reference.

    python benchmarks/bench_equal_recovery.py --run ~/.cache/nasprune/supernets/<key> --front <pareto.json>
        --table <latency table json> [--budgets 0.75,0.5,0.33,0.25] [--split-seed 0] [--rfp-samples 512]
        [--section NAME] [--no-docs]

Recoveries go to the super-network's own cache (a compile that ships the same point reuses them, and a rerun of
this benchmark does too: its ``s`` column then says ``cached``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dev_halves, docs_arguments, machine, markdown_table, publish, section_name  # noqa: E402

METHODS = ("NAS (nasprune)", "retraining-free (mask)", "uniform ratio", "layer dropping")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a compile's cached super-network (or a trained run folder)")
    ap.add_argument("--front", required=True, help="pareto.json of a compile of that super-network")
    ap.add_argument("--table", required=True, help="the fp32 latency table the compile used (budgets, predictions)")
    ap.add_argument("--budgets", default="0.75,0.5,0.33,0.25", help="shares of the unpruned fp32 latency")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the dev set's split in two halves")
    ap.add_argument("--rfp-samples", type=int, default=512, help="training examples for retraining-free pruning's "
                    "mask gradients (default: 512, the default preset's)")
    docs_arguments(ap, "bench_equal_recovery")
    args = ap.parse_args()

    import onnxruntime as ort

    from latency_models.grid import as_target, export_graph
    from latency_models.lookup_table import LatencyTable
    from toolchain.core.subnetwork import SubNetwork, layer_drop_subnet
    from toolchain.recover import RecoverSettings, recover_point
    from toolchain.run import load_run
    from toolchain.ship.verify import predict_onnx, predict_torch
    from toolchain.twins import fisher_gradients, fisher_mask, largest_uniform

    run = load_run(args.run)
    table = LatencyTable.load(args.table)
    target = as_target(table.fingerprint.get("target") or "cpu")
    dims, space = run.supernet.dims, run.space
    full = run.supernet.full()
    unpruned_ms = table.predict_latency(full)
    full_params = space.num_parameters(full)
    dev, scores = dev_halves(run, args.split_seed)
    settings = RecoverSettings()
    front = [SubNetwork(**r["subnet"]) for r in json.loads(Path(args.front).read_text())["pareto"]]
    shared = {}  # sub-network key -> (half A, half B, whole) with the shared weights

    def shared_scores(s):
        if s.key() not in shared:
            shared[s.key()] = scores(predict_torch(run.supernet.slice(s), dev.inputs))
        return shared[s.key()]

    def largest(candidates, budget):
        fits = [s for s in candidates if table.predict_latency(s) <= budget]
        return max(fits, key=table.predict_latency) if fits else None

    grads = []  # retraining-free pruning's mask gradients, computed once when first needed

    def rfp_mask(budget):
        if not grads:
            grads.append(fisher_gradients(run, args.rfp_samples))
        return fisher_mask(grads[0], budget, table.predict_latency)

    def choose(method, budget):
        if method == METHODS[0]:
            fits = [s for s in front if table.predict_latency(s) <= budget]
            return max(fits, key=lambda s: shared_scores(s)[0]) if fits else None
        if method == METHODS[1]:
            return rfp_mask(budget)
        if method == METHODS[2]:
            return largest_uniform(run, lambda s: {"latency": table.predict_latency(s)},
                                   lambda c: c["latency"] <= budget)
        return largest([layer_drop_subnet(dims, k) for k in range(1, dims.num_layers + 1)], budget)

    def int8_scores(model):
        with tempfile.TemporaryDirectory(prefix="nasprune-bench-equal-recovery-") as tmp:
            path = export_graph(model, Path(tmp) / "model.onnx", "int8", target)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return scores(predict_onnx(session, dev.inputs))

    def evaluate(subnet):
        point = recover_point(run, subnet, settings, progress=False)
        return {"subnet": subnet, "ms": table.predict_latency(subnet),
                "params": space.num_parameters(subnet) / full_params, "before": shared_scores(subnet),
                "fp32": scores(predict_torch(point.model, dev.inputs)), "int8": int8_scores(point.model),
                "s": "cached" if point.info.get("cached") else f"{point.info['seconds']:.0f}",
                "texts": point.info["examples"]}

    reference = evaluate(full)
    print(f"unpruned: fp32 {reference['fp32'][2]:.4f}, int8 {reference['int8'][2]:.4f}", flush=True)
    rows = []
    for share in [float(b) for b in args.budgets.split(",")]:
        budget = share * unpruned_ms
        for method in METHODS:
            subnet = choose(method, budget)
            if subnet is None:
                rows.append([f"{share:.0%} = {budget:.1f} ms", method, "-", "", "", "", "", "", "", ""])
                continue
            r = evaluate(subnet)
            took = r["s"] if r["s"] == "cached" else f"{r['s']} s"
            print(f"{share:.0%} {method}: {subnet.key()} {r['ms']:.2f} ms, before {r['before'][2]:.4f}, fp32 "
                  f"{r['fp32'][2]:.4f}, int8 {r['int8'][2]:.4f} ({took})", flush=True)
            rows.append([f"{share:.0%} = {budget:.1f} ms", method, f"{subnet.key()} ({r['params']:.0%})",
                         f"{r['ms']:.2f}", f"{r['before'][2]:.4f}"]
                        + [f"{r[p][2]:.4f} ({100 * (r[p][2] - reference['fp32'][2]):+.1f})" for p in ("fp32", "int8")]
                        + [" / ".join(f"{h:.4f}" for h in r[p][:2]) for p in ("fp32", "int8")] + [r["s"]])
    ref_row = ["unpruned", "-", f"{full.key()} (100%)", f"{unpruned_ms:.2f}", f"{reference['before'][2]:.4f}",
               f"{reference['fp32'][2]:.4f}", f"{reference['int8'][2]:.4f} "
               f"({100 * (reference['int8'][2] - reference['fp32'][2]):+.1f})",
               " / ".join(f"{h:.4f}" for h in reference["fp32"][:2]),
               " / ".join(f"{h:.4f}" for h in reference["int8"][:2]), reference["s"]]
    md = ["## Every method with the same recovery (`bench_equal_recovery.py`)", "",
          f"`python benchmarks/bench_equal_recovery.py --run <super-network> --front <pareto.json> --table <table> "
          f"--budgets {args.budgets} --split-seed {args.split_seed}"
          + (f" --section {args.section}" if args.section else "") + f"`. Machine: {machine()}. Super-network: "
          f"{run.data.describe()} ({run.settings.get('train', {}).get('strategy')}); budgets: shares of the unpruned fp32 "
          f"model's predicted latency ({unpruned_ms:.2f} ms, fp32 table at the target's length). Each method's point "
          f"(NAS: the front's best shared-weight score on dev half A under the budget; retraining-free: the mask of "
          f"Kwon et al.'s Fisher search and rearrangement on the full network, gradients on {args.rfp_samples} "
          f"training examples, without its rescaling; uniform ratio and layer dropping: the largest under it) is "
          f"sliced from the super-network and recovered alike ({reference['texts']} texts, KL to the full network's "
          f"logits + labels, lr {settings.lr:g}, batch {settings.batch_size}, one epoch), then scored on the dev set "
          f"({len(dev)} examples): fp32 in torch, int8 as the ONNX model the "
          f"export builds (per-channel dynamic int8, ONNX Runtime). In brackets: points against the recovered "
          f"unpruned model in fp32. Half A / B: the two halves of the dev set (split seed {args.split_seed}); NAS "
          f"chose on half A. s: seconds of the recovery.", ""]
    md += markdown_table(["budget", "method", "point (parameters)", "predicted ms", "before", "fp32", "int8",
                          "fp32 half A / B", "int8 half A / B", "s"], [ref_row] + rows, right={3, 4, 5, 6, 9})
    publish(section_name("bench_equal_recovery", args.section), md, write=not args.no_docs)


if __name__ == "__main__":
    main()
