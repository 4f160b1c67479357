#!/usr/bin/env python3
"""Time and size the profiling micro-graphs on a target; write a latency table.

This file has two lives:

* inside nasprune it is the measuring back end of :func:`latency_models.profile.profile` (run as a clean worker
  process: ``python latency_models/bundle_runner.py --serve``), and
* copied into a profiling bundle as ``run_profile.py`` it runs on a device that has only Python, ``onnxruntime``
  and ``numpy`` (``psutil`` and ``tqdm`` are used when present)::

      python run_profile.py --out table.json
      python run_profile.py --measure-points RUN_OR_POINTS_DIR --out measured.json   # exported points, on the device

It therefore imports nothing from nasprune but the standalone ``targets.meter``, ``targets.session`` (the meter,
the session and fingerprint helpers) and ``latency_models.assemble`` (the table from the measurements), or, in a
bundle, their copies ``nasprune_meter.py``, ``nasprune_session.py`` and ``nasprune_assemble.py`` next to this file.

How one graph is measured: :func:`targets.meter.measure` (in a bundle, the copy ``nasprune_meter.py``), the meter
the export uses too -- median of per-run wall times after warm-up, and peak memory while serving minus the resident
size before the session (MB = 10^6 bytes), in a child process forked for that graph.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

try:  # inside nasprune (``targets`` imports nothing heavy: no scipy, no torch)
    from targets.meter import (E2E_ROUNDS, MEASURED_FORMAT, MEASURED_VERSION, MEMORY_METHOD, measure as measure_graph,
                               measure_beside, point_key, retake_disturbed)
    from targets.session import device_fingerprint, fingerprint_key, machine_fingerprint
except ImportError:  # inside a bundle (or run from a source tree that is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from nasprune_meter import (E2E_ROUNDS, MEASURED_FORMAT, MEASURED_VERSION, MEMORY_METHOD,  # type: ignore
                                    measure as measure_graph, measure_beside, point_key, retake_disturbed)
        from nasprune_session import device_fingerprint, fingerprint_key, machine_fingerprint  # type: ignore
    except ImportError:
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
        from targets.meter import (E2E_ROUNDS, MEASURED_FORMAT, MEASURED_VERSION, MEMORY_METHOD,
                                   measure as measure_graph, measure_beside, point_key, retake_disturbed)
        from targets.session import device_fingerprint, fingerprint_key, machine_fingerprint


def _assemble_table(*args, **kwargs) -> dict:
    """:func:`latency_models.assemble.assemble_table` (in a bundle, ``nasprune_assemble.py``), imported only when a
    table is written: importing the ``latency_models`` package loads scipy, and a measuring process (the
    :class:`latency_models.grid.Worker`) that has scipy's libraries resident measures a graph's memory a few MB
    lower than the export's fresh process or a device (3.2 MB of 24.8 for a tiny BERT)."""
    try:
        from nasprune_assemble import assemble_table  # type: ignore
    except ImportError:
        from latency_models.assemble import assemble_table
    return assemble_table(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ the grid run
def manifest_key(manifest: dict) -> str:
    """What must match for a partial result file to be resumed."""
    data = {k: manifest.get(k) for k in ("target", "precision", "model", "grid", "measurement", "graph_form")}
    data["graphs"] = [g["key"] for g in manifest["graphs"]]
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def partial_path_for(out_path) -> Path:
    return Path(str(out_path) + ".partial.json")


def progress_bar(total: int, initial: int, enabled: bool, desc: str, unit: str = "graph"):
    """A tqdm bar (``None`` when not ``enabled`` or where tqdm is not installed, as on a device)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    except ImportError:
        return None


def at_length(settings: dict, entry: dict) -> dict:
    """The target ``settings`` at ``entry``'s sequence length (``length``; default: the settings' own)."""
    return {**settings, "sequence_length": int(entry["length"])} if "length" in entry else settings


def run_grid(manifest: dict, out_path, fingerprint: dict, measure=None, prepare=None, release=None, on_point=None,
             progress: bool = True, resume: bool = True) -> dict:
    """Measure every graph of ``manifest`` not measured yet; after each, write ``<out_path>.partial.json``.

    ``prepare(entry) -> path`` makes the graph file (default: ``manifest['root']/entry['file']``), once for the
    consecutive entries of one file (a graph measured at several lengths), and ``release(path)`` lets it go after
    them; ``measure(path, entry) -> dict`` times it (default: :func:`targets.meter.measure` at the entry's length);
    ``on_point(key, result, n_done)`` is called after each point (tests use it to interrupt). Returns ``{key:
    result}`` for all graphs.
    """
    partial = partial_path_for(out_path)
    partial.parent.mkdir(parents=True, exist_ok=True)
    mkey = manifest_key(manifest)
    fkey = fingerprint_key(fingerprint)
    results: dict = {}
    if resume and partial.is_file():
        try:
            old = json.loads(partial.read_text())
            if old.get("manifest_key") == mkey and old.get("fingerprint_key") == fkey:
                results = dict(old.get("results", {}))
            else:
                print(f"note: {partial} belongs to another profile (grid, target or machine differ): starting over",
                      file=sys.stderr)
        except (json.JSONDecodeError, OSError, AttributeError):
            print(f"note: {partial} is unreadable: starting over", file=sys.stderr)
    keys = [g["key"] for g in manifest["graphs"]]
    results = {k: v for k, v in results.items() if k in keys}
    if measure is None:
        def measure(path, entry):
            return measure_graph(path, at_length(manifest["target"], entry), manifest["vocab_size"],
                                 manifest["measurement"])
    if prepare is None:
        root = Path(manifest.get("root", "."))
        prepare = lambda entry: root / entry["file"]  # noqa: E731
    todo = [g for g in manifest["graphs"] if g["key"] not in results]
    bar = progress_bar(len(keys), len(keys) - len(todo), progress, f"profiling {manifest['precision']}")
    held, path = None, None  # the file prepared for the entries at hand
    try:
        for entry in todo:
            if entry["file"] != held:
                if path is not None and release is not None:
                    release(path)
                held, path = entry["file"], prepare(entry)
            res = measure(path, entry)
            if "weight_bytes" in entry:
                res["weight_bytes"] = entry["weight_bytes"]
            results[entry["key"]] = res
            tmp = partial.with_suffix(".tmp")
            tmp.write_text(json.dumps({"manifest_key": mkey, "fingerprint_key": fkey, "results": results}))
            tmp.replace(partial)
            if bar is not None:
                bar.update(1)
            elif progress:
                print(f"  {len(results)}/{len(keys)} {entry['key']}: {res['latency_ms']:.3f} ms", file=sys.stderr)
            if on_point is not None:
                on_point(entry["key"], res, len(results))
    finally:
        if path is not None and release is not None:
            release(path)
        if bar is not None:
            bar.close()
    return results


def write_json(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def fingerprint_for(manifest: dict) -> dict:
    t = manifest["target"]
    return machine_fingerprint(t["providers"], t.get("optional_providers", ()), t.get("intra_op_threads", "auto"),
                               manifest["precision"], t.get("batch_size", 1), t.get("sequence_length", 128),
                               t.get("name", ""))


# ----------------------------------------------------------------------------------------- seeded weights
#: ONNX ``TensorProto`` data types whose values a bundle generates on the device from a seed, by name
SEEDED_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 10: "float16"}
#: initializers smaller than this keep their bytes in the bundle (scales, zero points, shapes: values that matter)
SEEDED_MIN_BYTES = 1024


def seeded_bytes(seed: int, index: int, nbytes: int, dtype: str) -> bytes:
    """``nbytes`` of values of ``dtype`` for initializer ``index`` of a bundle graph: floats uniform in +-0.04,
    int8 in -127..127, uint8 in 0..255, from numpy's PCG64 stream seeded with ``(seed, index)`` (the raw 64-bit
    stream, the same on every platform). Weight values do not change latency or memory; only their size does."""
    import numpy as np

    dt = np.dtype(dtype)
    raw = np.random.PCG64([int(seed), int(index)]).random_raw(nbytes // dt.itemsize)
    if dt.kind == "f":
        values = ((raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 - 0.5) * 0.08
    elif dt == np.int8:
        values = (raw % np.uint64(255)).astype(np.int16) - 127
    else:
        values = raw % np.uint64(256)
    return values.astype(dt).tobytes()


def materialize(stored, weights: dict, dst) -> Path:
    """Write the ONNX file of a bundle graph to ``dst``: ``stored`` holds it zlib-compressed with the bytes of its
    large initializers zeroed; ``weights`` (``seed``, ``regions``: ``[offset, length, dtype]`` in the file) says
    where they are, and they get :func:`seeded_bytes`. The result is the graph as nasprune built it, weights
    inline, with seeded values: a bundle ships a few MB instead of every graph's weights."""
    import zlib

    data = bytearray(zlib.decompress(Path(stored).read_bytes()))
    for i, (offset, length, dtype) in enumerate(weights.get("regions", ())):
        data[offset:offset + length] = seeded_bytes(weights["seed"], i, length, dtype)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


# ------------------------------------------------------------------------------------------- the bundle run
def _materializer(root: Path, scratch: Path):
    def prepare(entry: dict) -> Path:
        src = root / entry["file"]
        if "weights" not in entry:  # a bundle written before weights were seeded: the graph itself
            return src
        return materialize(src, entry["weights"], scratch / f"{entry['key']}.onnx")
    return prepare


def _releaser(scratch: Path):
    def release(path):
        if Path(path).parent == scratch:
            Path(path).unlink(missing_ok=True)
    return release


def run_end_to_end(manifest: dict, out_path, fingerprint: dict, prepare, release, progress: bool = True,
                   resume: bool = True) -> dict:
    """Measure the bundle's end-to-end sub-networks (``manifest['end_to_end']``: calibration and validation
    samples, as nasprune's own profile draws them), each beside the unpruned reference at the same length
    (:func:`targets.meter.measure_beside`; entries with a ``length`` at that length); resumable from
    ``<out_path>.e2e.partial.json``. Returns the rows nasprune fits the table's calibration and validation on
    (:meth:`LatencyTable.fit_end_to_end`)."""
    e2e = manifest.get("end_to_end")
    if not e2e:
        return {}
    vocab = e2e["vocab_size"]
    reference = prepare(e2e["reference"])
    rounds = int(e2e.get("rounds", E2E_ROUNDS))

    def measure(path, entry):
        settings = at_length(manifest["target"], entry)
        return measure_beside(lambda p: measure_graph(p, settings, vocab, manifest["measurement"]), path, reference,
                              int(entry.get("rounds", rounds)))

    samples = e2e["calibration"] + e2e["validation"]
    sub = {**{k: manifest.get(k) for k in ("target", "precision", "model", "measurement")}, "grid": "end_to_end",
           "graphs": samples}
    try:
        results = run_grid(sub, str(out_path) + ".e2e", fingerprint, measure=measure, prepare=prepare,
                           release=release, progress=progress, resume=resume)
        entries = {g["key"]: g for g in samples}

        def again(keys):  # those measured while the machine was disturbed, once more
            out = {}
            for k in keys:
                path = prepare(entries[k])
                try:
                    out[k] = measure(path, entries[k])
                finally:
                    release(path)
            return out

        retake_disturbed(results, again, group=lambda k: entries[k].get("length"),
                         on_retake=lambda n: progress and print(f"taking {n} disturbed measurements again",
                                                                file=sys.stderr))
    finally:
        release(reference)
    fields = ("latency_ms", "rounds_ms", "reference_ms", "reference_rounds_ms", "memory_mb", "retaken", "disturbed_ms")
    rows = {name: [{"subnet": g["subnet"], **({"length": g["length"]} if "length" in g else {}),
                    **{k: results[g["key"]][k] for k in fields if k in results[g["key"]]},
                    "weight_bytes": g.get("weight_bytes")}
                   for g in e2e[name]] for name in ("calibration", "validation")}
    return {"space": e2e.get("space"), "seed": e2e.get("seed"), "rounds": rounds,
            "reference": e2e["reference"]["subnet"], "where": "bundle (run_profile.py)", **rows}


def run_bundle(manifest_path, out_path, progress: bool = True, resume: bool = True) -> Path:
    """Profile a bundle here: the grid of micro-graphs, then the end-to-end sub-networks; write the table."""
    import shutil
    import tempfile

    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    root = manifest_path.parent
    manifest["root"] = str(root)
    fp = fingerprint_for(manifest)
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="nasprune-bundle-"))
    try:
        prepare, release = _materializer(root, scratch), _releaser(scratch)
        results = run_grid(manifest, out_path, fp, prepare=prepare, release=release, progress=progress,
                           resume=resume)
        e2e = run_end_to_end(manifest, out_path, fp, prepare, release, progress=progress, resume=resume)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = _assemble_table(manifest, results, fp, wall_s=time.perf_counter() - t0)
    table["measurement"]["where"] = "bundle (run_profile.py)"
    if e2e:  # nasprune fits calibration and validation from them when it reads the table
        table["end_to_end"] = e2e
    write_json(out_path, table)
    partial_path_for(out_path).unlink(missing_ok=True)
    partial_path_for(str(out_path) + ".e2e").unlink(missing_ok=True)
    return Path(out_path)


# ---------------------------------------------------------------------------------- exported points, measured
def measure_points(folder, manifest: dict, out_path, progress: bool = True) -> Path:
    """Measure every exported point below ``folder`` (a folder holding ``model.onnx`` and ``nasprune.json``: a run
    folder, its ``points/``, or one point) on this device, with the bundle's target settings and the point's batch
    and sequence length, by the same meter as everything else; write ``out_path`` (format ``MEASURED_FORMAT``)."""
    folder = Path(folder)
    points = sorted(p.parent for p in folder.rglob("nasprune.json") if (p.parent / "model.onnx").is_file())
    if not points:
        raise SystemExit(f"error: no exported point (model.onnx next to nasprune.json) under {folder}")
    target, results = manifest["target"], {}
    for i, point in enumerate(points, 1):
        info = json.loads((point / "nasprune.json").read_text())
        vocab_size = json.loads((point / "config.json").read_text())["vocab_size"]
        settings = {**target, "batch_size": info["batch_size"], "sequence_length": info["sequence_length"]}
        r = measure_graph(point / "model.onnx", settings, vocab_size, manifest.get("measurement"))
        memory = {k: r[k] for k in ("memory_mb", "loaded_mb", "baseline_rss_mb", "peak_rss_mb", "peak_reset",
                                    "gpu_memory_mb", "measured_on") if k in r}
        latency = {k: v for k, v in r.items() if k not in memory or k == "measured_on"}
        results[point_key(info)] = {"id": info.get("id"), "path": str(point.relative_to(folder)),
                                    "latency_ms": r["latency_ms"], "memory_mb": r["memory_mb"],
                                    "latency": latency, "memory": {**memory, "method": MEMORY_METHOD}}
        if progress:
            print(f"  {i}/{len(points)} {info.get('id')}: {r['latency_ms']:.3f} ms, {r['memory_mb']:.1f} MB",
                  file=sys.stderr)
    return write_json(out_path, {
        "format": MEASURED_FORMAT, "version": MEASURED_VERSION, "target": target.get("name"),
        "device": device_fingerprint(target["providers"], target.get("optional_providers", ())),
        "measurement": manifest.get("measurement"), "points": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ------------------------------------------------------------------------------------------ worker protocol
def serve(stdin=None, stdout=None) -> None:
    """One JSON request per line: ``{"path", "target", "vocab_size", "measurement"}`` -> one JSON reply per line."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            reply = measure_graph(req["path"], req["target"], req["vocab_size"], req.get("measurement"))
        except Exception as e:  # noqa: BLE001 - reported to the client
            reply = {"error": str(e)}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description="Profile the nasprune micro-graphs of this bundle on this device.")
    ap.add_argument("--manifest", default=str(here / "manifest.json"), help="bundle manifest (default: next to me)")
    ap.add_argument("--out", default=None,
                    help="latency table to write (default: table.json), or with --measure-points the measurements "
                         "(default: measured.json)")
    ap.add_argument("--measure-points", metavar="RUN_OR_POINTS_DIR", default=None,
                    help="measure the exported points (model.onnx + nasprune.json) below this folder on this device "
                         "instead; give the result to `nasprune export RUN --measured measured.json`")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-resume", action="store_true", help="ignore <out>.partial.json from an interrupted run")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.measure_points:
        manifest = json.loads(Path(args.manifest).read_text())
        out = measure_points(args.measure_points, manifest, args.out or "measured.json",
                             progress=not args.no_progress)
        print(f"wrote {out}")
        return 0
    out = run_bundle(args.manifest, args.out or "table.json", progress=not args.no_progress,
                     resume=not args.no_resume)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
