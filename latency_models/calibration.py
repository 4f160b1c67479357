"""End-to-end checks of a latency table: random sliced sub-networks built as compile builds them and measured
whole, to fit the table's calibration (:func:`calibrate`) and to record its prediction error (:func:`validate`).

Each sample is measured beside the unpruned network (the *reference*), so drift of a shared machine over the
minutes of calibration and validation can be told apart from prediction error (:func:`drift_corrected`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from latency_models.bundle_runner import progress_bar
from latency_models.grid import Worker, as_target, export_graph, onnx_weight_bytes
from latency_models.lookup_table import LatencyTable
from targets.meter import E2E_ROUNDS, measure_beside, retake_disturbed


def measure_subnet(model, subnet, target, precision: str, worker: Worker | None = None, workdir=None) -> dict:
    """Slice ``model`` to ``subnet``, build its ONNX (as compile does) and measure it on ``target``."""
    from toolchain.core.slicing import slice_model

    target = as_target(target)
    own = worker is None
    worker = worker or Worker()
    try:
        with tempfile.TemporaryDirectory(prefix="nasprune-e2e-", dir=workdir) as tmp:
            dst = export_graph(slice_model(model, subnet), Path(tmp) / "model.onnx", precision, target)
            res = worker.measure(dst, target, model.config.vocab_size, None)
            res["weight_bytes"] = onnx_weight_bytes(dst)
            return res
    finally:
        if own:
            worker.close()


def samples(space, n: int, seed: int) -> list:
    """``n`` sub-networks whose sizes span the whole range: sample ``i`` keeps about a share ``r_i`` of every layer's
    heads and FFN units, ``r_i`` stratified between 0.1 and 1 and each layer's shares jittered by +-0.15. Uniform
    random per-layer widths average out around half the network, which would leave the small and the near-full
    networks (where users' budgets lie) out of calibration and validation."""
    from toolchain.core.subnetwork import SubNetwork

    d = space.dims
    rng = np.random.default_rng([seed, 29])
    out = []
    while len(out) < n:
        r = 0.1 + 0.9 * (len(out) + rng.random()) / n

        def widths(top):
            return np.rint(np.clip(r + rng.uniform(-0.15, 0.15, d.num_layers), 0.0, 1.0) * top).astype(int)

        s = SubNetwork(widths(d.num_heads), widths(d.intermediate_size))
        if s.kept_layers:  # a network without layers is not a useful sample
            out.append(s)
    return [out[i] for i in rng.permutation(n)]  # sizes in no particular order


#: the exported samples kept on disk for the retakes (bytes); beyond it, a sample is exported again to be retaken
KEEP_BYTES = 4 << 30


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


#: validation samples measured at each of a table's other lengths too (one round each): the first ones, whose sizes are
#: spread (:func:`samples`). Every calibration sample is measured at every length: a length's calibration rests on as
#: many samples as the own length's (with 8 of 16 there, one round each, the two smallest validation networks of one
#: quiet-host run were over-predicted by 7.9 / 7.1 % at 32 tokens and 8.4 / 3.6 % at 256, by 4.5 / 3.0 % at 128)
LENGTH_SAMPLES = 8


def _measure_samples(table, model, space, n, seed, target, worker, progress, desc, length_samples):
    """Measure ``n`` random sub-networks end to end, alternating :data:`~targets.meter.E2E_ROUNDS` times with the
    unpruned network (the *reference*; :func:`targets.meter.measure_beside`, the export's rounds too):
    ``reference_ms`` says how fast the machine was at that moment, so drift of a shared machine over the minutes of
    calibration and validation can be told apart from prediction error (see :func:`drift_corrected`).
    ``latency_ms`` is the median of the sample's rounds (all in ``rounds_ms``). The first ``length_samples``
    are also measured at each other length of the table (one round beside the reference at that length). Those
    measured while the machine was disturbed are taken again at the end (:func:`targets.meter.retake_disturbed`).
    Returns ``{length: [(subnet, result)]}``."""
    from toolchain.core.slicing import slice_model

    target = as_target(target if target is not None else table.fingerprint.get("target") or "cpu")
    subnets = samples(space, n, seed)
    others = [x for x in table.lengths() if x != table.sequence_length]
    bar = progress_bar(n, 0, progress, desc, unit="net")
    own = worker is None
    worker = worker or Worker()

    def at(length):
        return lambda path: worker.measure(path, target, model.config.vocab_size, None, length=length)

    results: dict = {}  # (sample index, length or None: the table's own) -> result
    kept: dict = {}  # sample index -> (its ONNX file, weight bytes), kept for the retakes (KEEP_BYTES in all)

    def graph(i, tmp):
        """Sample ``i``'s ONNX model: exported once, kept for a retake while the kept files fit in KEEP_BYTES
        (exporting is a third of a sample's time, and on a busy machine a third of the samples are taken again)."""
        if i not in kept:
            folder = Path(tmp) / f"sample-{i}"
            folder.mkdir()
            dst = export_graph(slice_model(model, subnets[i]), folder / "model.onnx", table.precision, target)
            kept[i] = (dst, onnx_weight_bytes(dst))
        return kept[i]

    def release(i):
        if sum(_size(p.parent) for p, _ in kept.values()) > KEEP_BYTES:
            shutil.rmtree(kept.pop(i)[0].parent)

    def measure(keys, tmp, ref):
        """Measure the samples ``keys`` name (each exported once), beside the reference."""
        out = {}
        for i in sorted({i for i, _ in keys}):
            dst, weight_bytes = graph(i, tmp)
            for length in [x for j, x in keys if j == i]:  # reference and sample alternate: the same machine speed
                r = measure_beside(at(length), dst, ref, E2E_ROUNDS if length is None else 1)
                out[(i, length)] = {**r, "weight_bytes": weight_bytes}
            release(i)
        return out

    try:
        with tempfile.TemporaryDirectory(prefix="nasprune-ref-") as tmp:
            ref = export_graph(model, Path(tmp) / "reference.onnx", table.precision, target)
            for i in range(n):
                results.update(measure([(i, x) for x in [None] + (others if i < length_samples else [])], tmp, ref))
                if bar:
                    bar.update(1)
            retake_disturbed(results, lambda keys: measure(keys, tmp, ref), group=lambda k: k[1],
                             on_retake=lambda k: bar and bar.set_postfix_str(f"taking {k} disturbed again"))
    finally:
        if bar:
            bar.close()
        if own:
            worker.close()
    rows: dict = {table.sequence_length: [], **{x: [] for x in others}}
    for (i, length), r in results.items():  # in the order measured (a retake replaces its entry in place)
        rows[length or table.sequence_length].append((subnets[i], r))
    return rows


def calibrate(table: LatencyTable, model, space, n: int = 16, seed: int = 0, target=None, worker=None,
              progress: bool = False) -> dict:
    """Measure ``n`` random sliced sub-networks end to end, at each of the table's lengths, and fit its calibration
    on them there (:meth:`LatencyTable.calibrate_from`); stored in ``table`` (call ``table.save()`` to persist).
    Returns the calibration at the table's own length."""
    rows = _measure_samples(table, model, space, n, seed, target, worker, progress, "calibrating", length_samples=n)
    for length, part in rows.items():
        if part and length != table.sequence_length:
            table.at_length(length).calibrate_from(part)
    return table.calibrate_from(rows[table.sequence_length])


def validate(table: LatencyTable, model, space, n: int = 16, seed: int = 1, target=None, worker=None,
             progress: bool = False, length_samples: int = LENGTH_SAMPLES) -> dict:
    """Measure ``n`` held-out random sub-networks end to end and record the table's prediction error on them
    (:meth:`LatencyTable.validate_from`) in ``table.validation``, and, on the first ``length_samples`` of them, at
    each other length of the table in its view's (:meth:`LatencyTable.at_length`). Returns the validation at the
    table's own length."""
    rows = _measure_samples(table, model, space, n, seed, target, worker, progress, "validating",
                            length_samples=length_samples)
    for length, part in rows.items():
        if part and length != table.sequence_length:
            table.at_length(length).validate_from(part, space=space.name, seed=seed)
    return table.validate_from(rows[table.sequence_length], space=space.name, seed=seed)
