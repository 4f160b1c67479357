"""Exports of a recovered point, kept beside its recovered weights, so that a recompile does not build them again.

A recompile with a new budget that ships the same points used to spend most of its time exporting them again: in
one 10 ms recompile (py-spy, 146 s) building, verifying and scoring the ONNX models took 54 s and measuring them
65 s, while the recovered weights came from the cache in seconds. An export depends on the recovered weights, the
precision, the target's fingerprint (device, runtime, threads, batch, length), the data it is scored on, the lengths
it is measured at and the versions of the packages that build it; with all of them the same, its ONNX model,
verification and metric are the same. :func:`reuse_or_export` keeps each export of a recovered point under
``<recovered point>/exports/<key>`` (:func:`export_key`) and, when asked for the same export again, copies it into the
run instead of building it.

What depends on the machine's state is taken again: the latency at the target's length, in rounds beside the unpruned
reference (drift-corrected), so a shipped point is judged by a measurement of this compile. Its memory and its
latency at the other lengths are the cached export's, and ``nasprune.json["reused"]`` says so (``measured``: when
they were taken).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.core.atomic import write_json_atomic
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.export import FORMAT, ExportResult
from toolchain.ship.jsonfile import versions
from toolchain.ship.verify import MetricData, Reference, measure_exported, meter_settings

log = logging.getLogger(__name__)

#: the folder, inside a recovered point's cache folder, that holds its exports
EXPORTS = "exports"


def metric_data_key(metric_data: MetricData | None) -> str | None:
    """A digest of the rows an export is scored on (inputs and labels) and of how (the metric's name, the parts)."""
    if metric_data is None:
        return None
    h = hashlib.sha1()
    for name in sorted(metric_data.inputs):
        h.update(name.encode())
        h.update(np.ascontiguousarray(metric_data.inputs[name]).tobytes())
    h.update(np.ascontiguousarray(metric_data.labels).tobytes())
    h.update(json.dumps({"name": metric_data.name, "extra": metric_data.extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def export_key(precision: str, target, metric_data: MetricData | None, lengths) -> str:
    """What an export of given recovered weights depends on besides them: precision, the target's fingerprint in that
    precision, the scoring data, the other lengths measured, the export format and the package versions."""
    payload = {"format": FORMAT, "precision": precision, "target": target.fingerprint(precision),
               "metric": metric_data_key(metric_data), "lengths": sorted(int(n) for n in lengths),
               "versions": versions()}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse_or_export(store: Path, key: str, out_dir: Path, build: Callable[[], ExportResult], *, point_id: str,
                    predicted: dict | None, extra: dict | None, target, reference: Reference | None) -> ExportResult:
    """The export ``build()`` would write to ``out_dir``, from ``store / key`` when it holds it (then only its latency
    at the target's length is measured again, beside ``reference``); else built, then kept there."""
    cached = store / key
    if not (cached / "nasprune.json").is_file():
        res = build()
        tmp = store / f".{key}.partial-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(res.path, tmp)  # copies, not links: editing a shipped model leaves the kept one
            os.replace(tmp, cached)
        except OSError as e:  # a full disk must not fail the compile: the next one builds it again
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("export %s not cached: %s", res.point_id, e)
        return res
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(cached, tmp)  # (a second or so for an fp32 export of the default model)
        info = json.loads((tmp / "nasprune.json").read_text())
        vocab = json.loads((tmp / "config.json").read_text())["vocab_size"]
        settings = meter_settings(target, None, info["batch_size"], info["sequence_length"])
        again = measure_exported(tmp / "model.onnx", settings, vocab, memory=False, reference=reference)
        before = info["measured"]
        info["measured"] = {**before, **{k: v for k, v in again.items() if k not in ("memory_mb", "memory")}}
        if "latency_by_length_ms" in before:  # (the other lengths: the cached export's)
            info["measured"]["latency_by_length_ms"] = {**before["latency_by_length_ms"],
                                                        str(info["sequence_length"]): again["latency_ms"]}
            if again.get("reference") and (before.get("reference") or {}).get("latency_by_length_ms"):
                info["measured"]["reference"]["latency_by_length_ms"] = {
                    **before["reference"]["latency_by_length_ms"],
                    str(info["sequence_length"]): again["reference"]["latency_ms"]}
        info["reused"] = {"export": str(cached), "created": info.get("created"),
                          "measured_again": "latency at the target's length, beside the unpruned reference",
                          "kept": "the ONNX model, its verification and metric, memory, latency at other lengths"}
        info.update(id=point_id, predicted={**info["predicted"], **(predicted or {})}, extra=extra or {})
        write_json_atomic(tmp / "nasprune.json", info)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export %s reused from %s (latency measured again)", point_id, cached)
    return ExportResult(path=out_dir, point_id=point_id, subnet=SubNetwork.from_dict(info["subnetwork"]), info=info)
