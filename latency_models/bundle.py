"""Profiling bundles: the micro-graphs, their manifest and the standalone runner, for a device without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import targets.meter
import targets.session

from latency_models import bundle_runner as runner
from latency_models.grid import DEFAULT_UNIT_STEP, MicroGraphBuilder, as_target, make_manifest

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


def write_bundle(dims, target, precision: str | None, dst_dir, model_config=None,
                 unit_step: int = DEFAULT_UNIT_STEP, measurement: dict | None = None, progress: bool = True) -> Path:
    """Write the micro-graphs (``graphs/*.onnx``), ``manifest.json``, ``run_profile.py`` (a copy of
    :mod:`latency_models.bundle_runner`, with its meter and session helpers as ``nasprune_meter.py`` and
    ``nasprune_session.py``) and a README into ``dst_dir``; returns the folder. The device needs only onnxruntime
    and numpy."""
    target = as_target(target)
    precision = target.check_precision(precision)
    dst = Path(dst_dir)
    (dst / "graphs").mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(dims, target, precision, unit_step, measurement)
    builder = MicroGraphBuilder(dims, target, precision, model_config)
    entries = manifest["graphs"]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(entries), desc="exporting micro-graphs", unit="graph", dynamic_ncols=True)
        except ImportError:
            pass
    for entry in entries:
        builder.build(entry, dst / entry["file"])
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    runner.write_json(dst / "manifest.json", manifest)
    shutil.copyfile(runner.__file__, dst / "run_profile.py")
    shutil.copyfile(targets.meter.__file__, dst / "nasprune_meter.py")
    shutil.copyfile(targets.session.__file__, dst / "nasprune_session.py")
    (dst / "README.txt").write_text(BUNDLE_README.format(target=target.name, precision=precision, **dims.to_dict()))
    return dst
