"""Profiling bundles: the micro-graphs, their manifest and the standalone runner, for a device without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import targets.meter
import targets.session

from latency_models import assemble, bundle_runner as runner
from latency_models.calibration import LENGTH_SAMPLES, samples
from latency_models.grid import (DEFAULT_LENGTHS, DEFAULT_UNIT_STEP, MicroGraphBuilder, as_target, config_for,
                                  export_graph, make_manifest, onnx_weight_bytes, table_lengths)
from targets.meter import E2E_ROUNDS

BUNDLE_README = """nasprune profiling bundle
=========================

Profiles the blocks of a {model_type} model (hidden {hidden_size}, {num_heads} heads, FFN {intermediate_size}) for
target '{target}' at precision {precision}. Needs Python >= 3.9, onnxruntime and numpy (psutil and tqdm are used
when installed). On the device:

    python run_profile.py --out table.json

An interrupted run resumes from table.json.partial.json. Copy table.json back and pass it to nasprune
(--latency-table table.json) or put it in the table cache (see docs/profiling.md).

Then, to check what a compile ships on this device, copy its run folder here and measure its exported points:

    python run_profile.py --measure-points RUN --out measured.json

and give the result back to nasprune: nasprune export RUN --measured measured.json
"""


def store_seeded(onnx_path, dst, seed: int = 0) -> dict:
    """Store the ONNX graph ``onnx_path`` as a bundle carries it: its large initializers (:data:`runner.SEEDED_DTYPES`,
    at least :data:`runner.SEEDED_MIN_BYTES`) take :func:`runner.seeded_bytes` values, their bytes are zeroed in the
    file, which is zlib-compressed to ``dst``. Returns the entry's ``weights`` (``seed``, ``regions``); on the device
    :func:`runner.materialize` gives back exactly the graph with the seeded values."""
    import zlib

    import onnx

    model = onnx.load(str(onnx_path))
    seeded = []
    for t in model.graph.initializer:
        dtype = runner.SEEDED_DTYPES.get(t.data_type)
        if dtype and t.HasField("raw_data") and len(t.raw_data) >= runner.SEEDED_MIN_BYTES:
            t.raw_data = runner.seeded_bytes(seed, len(seeded), len(t.raw_data), dtype)
            seeded.append((t.raw_data, dtype))
    data = bytearray(model.SerializeToString())
    regions, at = [], 0
    for raw, dtype in seeded:  # initializers are serialized in order; random bytes this long occur once
        offset = data.find(raw, at)
        if offset < 0:
            raise RuntimeError(f"{onnx_path}: an initializer's bytes were not found in the serialized graph")
        data[offset:offset + len(raw)] = bytes(len(raw))
        regions.append([offset, len(raw), dtype])
        at = offset + len(raw)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(zlib.compress(bytes(data), 6))
    return {"seed": int(seed), "regions": regions}


def _store(src, dst: Path, rel: str, seed: int) -> dict:
    """Seed and store ``src`` at ``dst`` (``rel``: its path in the bundle); the entry fields it gets."""
    return {"file": rel, "weights": store_seeded(src, dst, seed), "weight_bytes": onnx_weight_bytes(src)}


def end_to_end_entries(dims, target, precision: str, dst: Path, model_config=None, calibrate_samples: int = 16,
                       validate_samples: int = 16, space: str = "medium", seed: int = 0, progress: bool = True,
                       lengths=(), length_validation: int = LENGTH_SAMPLES) -> dict:
    """The bundle's end-to-end part: the unpruned network (the reference) and the random sub-networks that
    nasprune's own profile calibrates and validates on (same space, same seeds: :func:`calibration.samples`),
    built as compile builds them (random weights of the real architecture), stored seeded under
    ``graphs/e2e/``. Every calibration sample and the first ``length_validation`` validation samples
    are measured at the other ``lengths`` too (entries ``<key>@<length>``, one round each), as a host profile does."""
    import tempfile

    import torch

    from toolchain.core.modeling import model_from_config
    from toolchain.core.search_space import make_space
    from toolchain.core.slicing import slice_model
    from toolchain.core.subnetwork import SubNetwork

    sp = make_space(space, dims)
    torch.manual_seed(0)
    model = model_from_config(config_for(dims, model_config)).eval()
    sets = {"calibration": samples(sp, calibrate_samples, seed), "validation": samples(sp, validate_samples, seed + 1)}
    full = SubNetwork.full(dims.num_layers, dims.num_heads, dims.intermediate_size)
    todo = [("reference", 0, full)] + [(name, i, s) for name, subs in sets.items() for i, s in enumerate(subs)]
    out = {"space": sp.name, "seed": seed, "rounds": E2E_ROUNDS, "vocab_size": dims.vocab_size,
           "calibration": [], "validation": []}
    bar = runner.progress_bar(len(todo), 0, progress, "exporting end-to-end sub-networks")
    with tempfile.TemporaryDirectory(prefix="nasprune-bundle-") as tmp:
        for name, i, sub in todo:
            key = name if name == "reference" else f"{name}-{i:02d}"
            onnx_path = export_graph(slice_model(model, sub), Path(tmp) / "model.onnx", precision, target)
            rel = f"graphs/e2e/{key}.onnx.z"
            entry = {"key": key, "subnet": sub.to_dict(), **_store(onnx_path, dst / rel, rel, seed)}
            if name == "reference":
                out["reference"] = entry
            else:
                out[name].append(entry)
                if name == "calibration" or i < length_validation:
                    out[name].extend({**entry, "key": f"{key}@{n}", "length": n, "rounds": 1}
                                     for n in lengths if n != target.sequence_length)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return out


def write_bundle(dims, target, precision: str | None, dst_dir, model_config=None,
                 unit_step: int = DEFAULT_UNIT_STEP, measurement: dict | None = None, progress: bool = True,
                 calibrate_samples: int = 16, validate_samples: int = 16, space: str = "medium",
                 seed: int = 0, lengths=DEFAULT_LENGTHS, length_validation: int = LENGTH_SAMPLES) -> Path:
    """Write the micro-graphs (``graphs/*.onnx.z``, weights generated on the device from a seed:
    :func:`store_seeded`), the end-to-end calibration and validation sub-networks (:func:`end_to_end_entries`),
    ``manifest.json``, ``run_profile.py`` (a copy of :mod:`latency_models.bundle_runner`, with its meter and session
    helpers as ``nasprune_meter.py`` and ``nasprune_session.py``) and a README into ``dst_dir``; returns the folder.
    The device needs only onnxruntime and numpy."""
    import tempfile

    target = as_target(target)
    precision = target.check_precision(precision)
    dst = Path(dst_dir)
    (dst / "graphs").mkdir(parents=True, exist_ok=True)
    builder = MicroGraphBuilder(dims, target, precision, model_config)
    lengths = table_lengths(target, builder.config, lengths)
    manifest = make_manifest(dims, target, precision, unit_step, measurement, lengths)
    entries = manifest["graphs"]
    bar = runner.progress_bar(len(entries), 0, progress, "exporting micro-graphs")
    stored: dict = {}  # one file per graph, measured at several lengths
    with tempfile.TemporaryDirectory(prefix="nasprune-bundle-") as tmp:
        for entry in entries:
            if entry["file"] not in stored:
                onnx_path = builder.build(entry, Path(tmp) / "graph.onnx")
                rel = entry["file"] + ".z"
                stored[entry["file"]] = _store(onnx_path, dst / rel, rel, seed)
            entry.update(stored[entry["file"]])
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    if calibrate_samples or validate_samples:
        manifest["end_to_end"] = end_to_end_entries(dims, target, precision, dst, model_config, calibrate_samples,
                                                    validate_samples, space, seed, progress, lengths,
                                                    length_validation)
    runner.write_json(dst / "manifest.json", manifest)
    shutil.copyfile(runner.__file__, dst / "run_profile.py")
    shutil.copyfile(targets.meter.__file__, dst / "nasprune_meter.py")
    shutil.copyfile(targets.session.__file__, dst / "nasprune_session.py")
    shutil.copyfile(assemble.__file__, dst / "nasprune_assemble.py")
    (dst / "README.txt").write_text(BUNDLE_README.format(target=target.name, precision=precision, **dims.to_dict()))
    return dst
