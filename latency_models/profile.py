"""Profiling a model family on a target: measure the grid of micro-graphs (:mod:`latency_models.grid`), assemble
the latency table, calibrate and validate it end to end (:mod:`latency_models.calibration`).

A device without torch is profiled through a bundle instead (:func:`latency_models.bundle.write_bundle`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from latency_models import bundle_runner as runner
from latency_models.calibration import LENGTH_SAMPLES, calibrate, validate
from latency_models.assemble import assemble_table
from latency_models.grid import (DEFAULT_LENGTHS, DEFAULT_UNIT_STEP, MicroGraphBuilder, Worker, as_target, config_for,
                                  make_manifest, table_lengths)
from latency_models.lookup_table import LatencyTable


def profile(dims, target, precision: str | None, out_path, model_config=None, unit_step: int = DEFAULT_UNIT_STEP,
            progress: bool = True, *, resume: bool = True, measurement: dict | None = None,
            on_point: Callable | None = None, model=None, calibrate_samples: int = 0, validate_samples: int = 0,
            space: str = "medium", seed: int = 0, lengths=DEFAULT_LENGTHS,
            length_validation: int = LENGTH_SAMPLES) -> LatencyTable:
    """Profile ``dims``' blocks on ``target`` at ``precision``; write and return the :class:`LatencyTable`.

    Grid: every head count 0..H, units every ``unit_step`` (0..I). Each point's result is appended to
    ``<out_path>.partial.json``; an interrupted profile resumes from it (``resume=True``). ``on_point(key, result,
    n_done)`` is called after each measured point. With ``calibrate_samples`` / ``validate_samples`` > 0, random
    sub-networks of ``space`` (of ``model``, or a random-weight model of ``model_config`` / ``dims``) are measured
    end to end to fit the calibration and to record the validation error.

    The table covers the sequence ``lengths`` the model takes besides the target's own: the cross of the grid, every
    calibration sample and the first ``length_validation`` validation samples are measured at each too
    (:func:`latency_models.grid.make_manifest`, :data:`latency_models.calibration.LENGTH_SAMPLES`); ``lengths=()``:
    the target's length only.
    """
    target = as_target(target)
    precision = target.check_precision(precision)
    target.check_host()  # the target's architecture, its providers available and starting here; else: the bundle
    out_path = Path(out_path)
    builder = MicroGraphBuilder(dims, target, precision, model_config)
    manifest = make_manifest(dims, target, precision, unit_step, measurement,
                             table_lengths(target, builder.config, lengths))
    fp = target.fingerprint(precision)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nasprune-profile-") as tmp, Worker() as worker:
        def prepare(entry):
            return builder.build(entry, Path(tmp) / f"{entry['key']}.onnx")

        def measure(path, entry):
            return worker.measure(path, target, manifest["vocab_size"], manifest["measurement"], entry.get("length"))

        results = runner.run_grid(manifest, out_path, fp, measure=measure, prepare=prepare,
                                  release=lambda path: Path(path).unlink(missing_ok=True), on_point=on_point,
                                  progress=progress, resume=resume)
        data = assemble_table(manifest, results, fp, wall_s=None)
        data["measurement"]["profile_wall_s"] = time.perf_counter() - t0
        data["measurement"]["where"] = "nasprune profile"
        table = LatencyTable(data, out_path)
        if calibrate_samples or validate_samples:
            if model is None:  # random weights of the real architecture: values do not change latency or memory
                import torch

                from toolchain.core.modeling import model_from_config

                torch.manual_seed(0)
                model = model_from_config(config_for(dims, model_config)).eval()
            from toolchain.core.search_space import make_space

            sp = make_space(space, dims)
            if calibrate_samples:
                calibrate(table, model, sp, calibrate_samples, seed=seed, target=target, worker=worker,
                          progress=progress)
            if validate_samples:
                validate(table, model, sp, validate_samples, seed=seed + 1, target=target, worker=worker,
                         progress=progress, length_samples=length_validation)
    data["measurement"]["wall_s"] = time.perf_counter() - t0
    table.save(out_path)
    runner.partial_path_for(out_path).unlink(missing_ok=True)
    return table
