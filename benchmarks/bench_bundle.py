#!/usr/bin/env python3
"""How big is a device's profiling bundle, and does what it carries give back the graphs nasprune built?

    python benchmarks/bench_bundle.py [--model PATH] [--target arm64] [--precisions fp32 int8] [--keep DIR] [--no-docs]

Writes the bundle of the default model (all-MiniLM-L6-v2) for each precision, as ``nasprune-profile --target T
--precision P --bundle DIR`` does (default grid and lengths, 16 calibration and 16 validation sub-networks), and
prints its size on disk, how many graphs it holds and how long writing it took; then it materializes every graph
the way the device does (``run_profile.py``: seeded weights put back) and checks that each loads in ONNX Runtime
with as many initializers, and as many bytes of them, as the stored graph says. Writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, publish  # noqa: E402


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def check_graphs(bundle: Path) -> tuple[int, float]:
    """Materialize every stored graph as the device does; each must load, with the weight bytes the manifest says.
    Returns (graphs checked, their total size in MB once materialized)."""
    import onnx
    import onnxruntime as ort

    from latency_models.bundle_runner import materialize

    manifest = json.loads((bundle / "manifest.json").read_text())
    e2e = manifest.get("end_to_end") or {}
    entries = {e["file"]: e for e in manifest["graphs"] + [e2e["reference"]] + e2e["calibration"] + e2e["validation"]}
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="nasprune-bundle-check-") as tmp:
        for i, entry in enumerate(entries.values()):
            path = materialize(bundle / entry["file"], entry["weights"], Path(tmp) / f"g{i}.onnx")
            total += path.stat().st_size / 1e6
            model = onnx.load(str(path))
            nbytes = sum(len(t.raw_data) for t in model.graph.initializer if t.raw_data)
            if nbytes < entry["weight_bytes"] * 0.99:
                raise SystemExit(f"{entry['file']}: {nbytes} initializer bytes, the manifest says {entry['weight_bytes']}")
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            path.unlink()
    return len(entries), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder / id (default: all-MiniLM-L6-v2)")
    ap.add_argument("--target", default="arm64", help="target name or TOML (default: arm64)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--keep", default=None, help="write the bundles below this folder and keep them")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    from latency_models.cache import run_profile

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nasprune-bench-bundle-"))
    rows = []
    for precision in args.precisions:
        dst = root / f"{args.target}-{precision}"
        t0 = time.perf_counter()
        run_profile(args.target, model=args.model, precision=precision, bundle=str(dst), progress=False)
        seconds = time.perf_counter() - t0
        manifest = json.loads((dst / "manifest.json").read_text())
        n_files = len({g["file"] for g in manifest["graphs"]})
        checked, inflated = check_graphs(dst)
        rows.append((precision, folder_mb(dst), n_files, len(manifest["graphs"]), manifest["lengths"], checked,
                     inflated, seconds))
        print(f"{args.target} {precision}: {rows[-1][1]:.1f} MB, {n_files} micro-graphs measured {len(manifest['graphs'])} "
              f"times at lengths {manifest['lengths']}; {checked} graphs materialize to {inflated:.0f} MB; written in "
              f"{seconds:.0f} s", flush=True)
    md = ["## Device bundle size (`bench_bundle.py`)", "",
          f"`python benchmarks/bench_bundle.py --target {args.target} --precisions {' '.join(args.precisions)}`. "
          f"Machine: {machine()}. Model: {args.model or 'all-MiniLM-L6-v2'}; the bundle `nasprune-profile --target "
          f"{args.target} --precision P --bundle DIR` writes (default grid, lengths, 16 + 16 end-to-end "
          "sub-networks). *Materialized*: the graphs as the device writes them back before measuring each (seeded "
          "weights inline), every one loaded in ONNX Runtime.", ""]
    md += markdown_table(["precision", "bundle on disk", "micro-graphs (measurements)", "lengths", "graphs in all",
                          "materialized", "written in"],
                         [[precision, f"{mb:.1f} MB", f"{n_files} ({n_meas})", ", ".join(map(str, lengths)), checked,
                           f"{inflated:.0f} MB", f"{seconds:.0f} s"]
                          for precision, mb, n_files, n_meas, lengths, checked, inflated, seconds in rows],
                         right={1, 2, 4, 5, 6})
    publish("bench_bundle", md, write=not args.no_docs)


if __name__ == "__main__":
    main()
