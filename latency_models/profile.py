"""Profiling a model family on a target: micro-graphs, timing, calibration, validation, device bundles.

The micro-graphs are what the compiler really ships, cut down to one layer: a one-layer model of the family,
sliced to ``h`` heads and ``u`` FFN units and exported with :func:`toolchain.onnx.build.build_onnx` (same export,
same ONNX Runtime fusion into ``Attention`` / ``SkipLayerNormalization`` / ``BiasGelu``, same int8 quantization),
plus the zero-layer model (embeddings, pooler, classifier). Weights are random: values do not change latency.

Measuring happens in a clean worker process (``python latency_models/bundle_runner.py --serve``) that forks one
child per graph; see :mod:`latency_models.bundle_runner` for the statistic and the memory method. The same runner,
copied into a bundle by :func:`write_bundle`, profiles a device that has no torch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from targets import Target, load_target
from targets.session import ProviderUnavailableError, probe_providers

from latency_models import bundle_runner as runner
from latency_models.lookup_table import LatencyTable, error_stats

log = logging.getLogger(__name__)

DEFAULT_UNIT_STEP = 128


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet():
    """ORT's optimizer and quantizer log expected warnings for every sliced graph; keep the progress bar clean."""
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _target(target) -> Target:
    return target if isinstance(target, Target) else load_target(target)


def config_for(dims, model_config=None, num_layers: int | None = None):
    """A config of the family with ``dims``' widths (from ``model_config`` when given) and ``num_layers`` layers."""
    if model_config is not None:
        cfg = copy.deepcopy(model_config)
    else:
        from transformers import AutoConfig

        kw = dict(vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, num_attention_heads=dims.num_heads,
                  intermediate_size=dims.intermediate_size, num_labels=dims.num_labels,
                  num_hidden_layers=dims.num_layers)
        if dims.model_type in ("roberta", "xlm-roberta"):
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, max_position_embeddings=514)
        cfg = AutoConfig.for_model(dims.model_type, **kw)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    return cfg


def check_sequence_length(config, target: Target) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta"):
        limit -= getattr(config, "pad_token_id", 1) + 1  # RoBERTa positions start after the padding index
    if limit is not None and target.sequence_length > limit:
        raise ValueError(f"target '{target.name}' has sequence_length {target.sequence_length}, but the model takes "
                         f"at most {limit} positions (max_position_embeddings); use a target with a shorter sequence")


def unit_grid(intermediate_size: int, unit_step: int = DEFAULT_UNIT_STEP) -> list[int]:
    if unit_step < 1:
        raise ValueError(f"unit_step must be >= 1, got {unit_step}")
    units = list(range(0, intermediate_size + 1, unit_step))
    if units[-1] != intermediate_size:
        units.append(intermediate_size)
    return units


def onnx_weight_bytes(path) -> int:
    """Bytes of all initializers of an ONNX graph (exact weight size at its precision)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


class Worker:
    """A clean measuring process (no torch imported) speaking the bundle runner's JSON-lines protocol."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(runner.__file__).resolve()), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def measure(self, path, target: Target, vocab_size: int, measurement: dict | None = None) -> dict:
        req = {"path": str(path), "target": target.settings(), "vocab_size": vocab_size, "measurement": measurement}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the measuring worker process died")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ micro-graphs
MICRO_VOCAB = 512


def make_manifest(dims, target: Target, precision: str, unit_step: int = DEFAULT_UNIT_STEP,
                  measurement: dict | None = None) -> dict:
    """The graphs to measure: ``base`` (zero-layer model, real vocabulary), and, when the vocabulary is larger
    than :data:`MICRO_VOCAB`, ``base_micro`` plus one-layer models with a :data:`MICRO_VOCAB`-row embedding (block
    costs are differences between graphs of the same vocabulary; a small embedding makes export 4x faster and
    does not change the encoder layer's cost)."""
    heads = list(range(dims.num_heads + 1))
    units = unit_grid(dims.intermediate_size, unit_step)
    micro = dims.vocab_size > MICRO_VOCAB
    vocab = "micro" if micro else "full"
    graphs = [{"key": "base", "file": "graphs/base.onnx", "heads": 0, "units": 0, "layers": 0, "vocab": "full"}]
    if micro:
        graphs.append({"key": "base_micro", "file": "graphs/base_micro.onnx", "heads": 0, "units": 0, "layers": 0,
                       "vocab": "micro"})
    for h in heads:
        for u in units:
            if h or u:
                k = runner.grid_key(h, u)
                graphs.append({"key": k, "file": f"graphs/{k}.onnx", "heads": h, "units": u, "layers": 1,
                               "vocab": vocab})
    return {
        "format": "nasprune.profile_manifest", "version": 1,
        "target": target.settings(), "precision": precision, "model": dims.to_dict(),
        # token ids fed to every graph are < vocab_size: valid for both vocabularies
        "vocab_size": min(dims.vocab_size, MICRO_VOCAB), "grid": {"heads": heads, "units": units},
        "measurement": {**runner.DEFAULT_MEASUREMENT, **(measurement or {})}, "graphs": graphs,
    }


class MicroGraphBuilder:
    """Exports the micro-graph of a manifest entry (one-layer model sliced to (h, u), or the zero-layer model)."""

    def __init__(self, dims, target: Target, precision: str, model_config=None):
        cfg = config_for(dims, model_config, num_layers=1)
        check_sequence_length(cfg, target)
        self._cfg = cfg
        self._models: dict = {}
        self.target, self.precision = target, precision

    def model(self, vocab: str = "full"):
        if vocab not in self._models:
            import torch

            from toolchain.core.modeling import model_from_config

            cfg = copy.deepcopy(self._cfg)
            if vocab == "micro":
                cfg.vocab_size = min(cfg.vocab_size, MICRO_VOCAB)
            torch.manual_seed(0)
            self._models[vocab] = model_from_config(cfg).eval()
        return self._models[vocab]

    def build(self, entry: dict, dst) -> Path:
        from toolchain.onnx.build import build_onnx
        from toolchain.core.slicing import slice_model
        from toolchain.core.subnetwork import SubNetwork

        sub = SubNetwork((entry["heads"],), (entry["units"],))
        with _quiet():
            build_onnx(slice_model(self.model(entry.get("vocab", "full")), sub), dst, self.precision, self.target.batch_size,
                       self.target.sequence_length, use_gpu=self.target.uses_gpu)
        entry["weight_bytes"] = onnx_weight_bytes(dst)
        return Path(dst)


# ------------------------------------------------------------------------------------------------------ profile
def profile(dims, target, precision: str | None, out_path, model_config=None, unit_step: int = DEFAULT_UNIT_STEP,
            progress: bool = True, *, resume: bool = True, measurement: dict | None = None,
            on_point: Callable | None = None, model=None, calibrate_samples: int = 0, validate_samples: int = 0,
            space: str = "medium", seed: int = 0) -> LatencyTable:
    """Profile ``dims``' blocks on ``target`` at ``precision``; write and return the :class:`LatencyTable`.

    Grid: every head count 0..H, units every ``unit_step`` (0..I). Each point's result is appended to
    ``<out_path>.partial.json``; an interrupted profile resumes from it (``resume=True``). ``on_point(key, result,
    n_done)`` is called after each measured point. With ``calibrate_samples`` / ``validate_samples`` > 0, random
    sub-networks of ``space`` (of ``model``, or a random-weight model of ``model_config`` / ``dims``) are measured
    end to end to fit the calibration and to record the validation error.
    """
    target = _target(target)
    precision = target.check_precision(precision)
    try:
        probe_providers(target.providers, target.optional_providers)  # a GPU provider must also start here
    except ProviderUnavailableError as e:
        raise ProviderUnavailableError(f"{e}. To profile target '{target.name}' on its own device, write a bundle "
                                       "(nasprune-profile --bundle DIR) and run it there.") from None
    out_path = Path(out_path)
    manifest = make_manifest(dims, target, precision, unit_step, measurement)
    fp = target.fingerprint(precision)
    t0 = time.perf_counter()
    builder = MicroGraphBuilder(dims, target, precision, model_config)
    with tempfile.TemporaryDirectory(prefix="nasprune-profile-") as tmp, Worker() as worker:
        def prepare(entry):
            return builder.build(entry, Path(tmp) / f"{entry['key']}.onnx")

        def measure(path):
            res = worker.measure(path, target, manifest["vocab_size"], manifest["measurement"])
            Path(path).unlink(missing_ok=True)
            return res

        results = runner.run_grid(manifest, out_path, fp, measure=measure, prepare=prepare, on_point=on_point,
                                  progress=progress, resume=resume)
        data = runner.assemble_table(manifest, results, fp, wall_s=None)
        data["measurement"]["profile_wall_s"] = time.perf_counter() - t0
        data["measurement"]["where"] = "nasprune profile"
        table = LatencyTable(data, out_path)
        if calibrate_samples or validate_samples:
            if model is None:
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
                         progress=progress)
    data["measurement"]["wall_s"] = time.perf_counter() - t0
    table.save(out_path)
    runner.partial_path_for(out_path).unlink(missing_ok=True)
    return table


# ------------------------------------------------------------------------------------------ end-to-end checks
def measure_subnet(model, subnet, target, precision: str, worker: Worker | None = None, workdir=None) -> dict:
    """Slice ``model`` to ``subnet``, build its ONNX (as compile does) and measure it on ``target``."""
    from toolchain.onnx.build import build_onnx
    from toolchain.core.slicing import slice_model

    target = _target(target)
    own = worker is None
    worker = worker or Worker()
    try:
        with tempfile.TemporaryDirectory(prefix="nasprune-e2e-", dir=workdir) as tmp:
            dst = Path(tmp) / "model.onnx"
            with _quiet():
                build_onnx(slice_model(model, subnet), dst, precision, target.batch_size, target.sequence_length,
                           use_gpu=target.uses_gpu)
            res = worker.measure(dst, target, model.config.vocab_size, None)
            res["weight_bytes"] = onnx_weight_bytes(dst)
            return res
    finally:
        if own:
            worker.close()


def _samples(space, n: int, seed: int) -> list:
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


#: end-to-end measurements of each calibration / validation sample, alternating with the unpruned reference; the
#: sample's latency is the median of the rounds (one window of ``min_time_s`` is at the mercy of a shared machine)
E2E_ROUNDS = 3


def _measure_samples(table, model, space, n, seed, target, worker, progress, desc):
    """Measure ``n`` random sub-networks end to end, alternating :data:`E2E_ROUNDS` times with the unpruned network
    (the *reference*): ``reference_ms`` says how fast the machine was at that moment, so drift of a shared machine
    over the minutes of calibration and validation can be told apart from prediction error (see
    :func:`drift_corrected`). ``latency_ms`` is the median of the sample's rounds (all in ``rounds_ms``)."""
    from toolchain.onnx.build import build_onnx
    from toolchain.core.slicing import slice_model

    target = _target(target) if target is not None else load_target(table.fingerprint.get("target") or "cpu")
    subnets = _samples(space, n, seed)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=desc, unit="net", dynamic_ncols=True)
        except ImportError:
            pass
    rows = []
    own = worker is None
    worker = worker or Worker()
    try:
        with tempfile.TemporaryDirectory(prefix="nasprune-ref-") as tmp:
            ref = Path(tmp) / "reference.onnx"
            with _quiet():
                build_onnx(model, ref, table.precision, target.batch_size, target.sequence_length,
                           use_gpu=target.uses_gpu)
            for s in subnets:
                dst = Path(tmp) / "sample.onnx"
                with _quiet():
                    build_onnx(slice_model(model, s), dst, table.precision, target.batch_size,
                               target.sequence_length, use_gpu=target.uses_gpu)
                refs, runs = [], []
                for _ in range(E2E_ROUNDS):  # reference and sample alternate: both see the same machine speed
                    refs.append(worker.measure(ref, target, model.config.vocab_size, None)["latency_ms"])
                    runs.append(worker.measure(dst, target, model.config.vocab_size, None))
                r = dict(runs[0])
                r["latency_ms"] = float(np.median([x["latency_ms"] for x in runs]))
                r["rounds_ms"] = [x["latency_ms"] for x in runs]
                r["reference_ms"] = float(np.median(refs))
                r["weight_bytes"] = onnx_weight_bytes(dst)
                rows.append((s, r))
                if bar:
                    bar.update(1)
    finally:
        if bar:
            bar.close()
        if own:
            worker.close()
    return rows


def _unpruned(space):
    from toolchain.core.subnetwork import SubNetwork

    d = space.dims
    return SubNetwork.full(d.num_layers, d.num_heads, d.intermediate_size)


def drift_corrected(measured: list[float], reference: list[float], speed_ms: float) -> list[float]:
    """Latencies rescaled to the machine speed at which the unpruned network takes ``speed_ms``: each measurement
    times ``speed_ms / reference`` (its own side-by-side measurement of the unpruned network)."""
    return [m * speed_ms / r for m, r in zip(measured, reference)]


def calibrate(table: LatencyTable, model, space, n: int = 10, seed: int = 0, target=None, worker=None,
              progress: bool = False) -> dict:
    """Fit ``measured = c * raw^2 + a * raw + b`` (latency; memory: ``a * raw + b``) on ``n`` random sliced
    sub-networks measured end to end; stores it in ``table`` (call ``table.save()`` to persist)."""
    rows = _measure_samples(table, model, space, n, seed, target, worker, progress, "calibrating")
    refs = [r["reference_ms"] for _, r in rows]
    speed = float(np.median(refs))  # the unpruned network's latency at calibration time
    # the unpruned network, measured beside every sample, anchors the top of the fit (median of all its runs)
    full = _unpruned(space)
    lat = table.set_calibration("latency", [table.raw_latency(s) for s, _ in rows] + [table.raw_latency(full)],
                                drift_corrected([r["latency_ms"] for _, r in rows], refs, speed) + [speed], degree=2)
    lat["reference_ms"] = speed
    for sample, (_, r) in zip(lat["samples"], rows):
        sample.update(measured_raw=r["latency_ms"], reference_ms=r["reference_ms"])
    lat["samples"][-1].update(subnet=full.to_dict(), reference=True)
    mem = table.set_calibration("memory", [table.raw_memory(s) for s, _ in rows], [r["memory_mb"] for _, r in rows])
    for cal, (kind, key) in zip((lat, mem), (("latency", "latency_ms"), ("memory", "memory_mb"))):
        for sample, (s, r) in zip(cal["samples"], rows):
            sample["subnet"] = s.to_dict()
    return {"latency": lat, "memory": mem}


def validate(table: LatencyTable, model, space, n: int = 10, seed: int = 1, target=None, worker=None,
             progress: bool = False) -> dict:
    """Prediction error on ``n`` held-out random sub-networks measured end to end; stored in ``table.validation``:
    MAPE, max error, share within +-5 % and +-10 %, for latency and memory, with every sample."""
    rows = _measure_samples(table, model, space, n, seed, target, worker, progress, "validating")
    out = {}
    for kind, key, pred in (("latency", "latency_ms", table.predict_latency), ("memory", "memory_mb", table.predict_memory)):
        p = [pred(s) for s, _ in rows]
        m = [r[key] for _, r in rows]
        stats = error_stats(p, m)
        stats["samples"] = [{"subnet": s.to_dict(), "predicted": float(a), "measured": float(b)}
                            for (s, _), a, b in zip(rows, p, m)]
        if kind == "latency":  # the same, with each measurement scaled to the calibration's machine speed
            speed = (table.calibration.get("latency") or {}).get("reference_ms")
            refs = [r["reference_ms"] for _, r in rows]
            for sample, ref in zip(stats["samples"], refs):
                sample["reference_ms"] = float(ref)
            if speed:
                stats["drift_corrected"] = error_stats(p, drift_corrected(m, refs, speed))
                stats["drift_corrected"]["method"] = ("measured x (unpruned latency at calibration / unpruned "
                                                      "latency measured just before this sample)")
            # the unpruned network itself: measured beside every sample, compared with its prediction
            stats["unpruned"] = {"predicted": float(pred(_unpruned(space))), "measured": float(np.median(refs)),
                                 "n": len(refs)}
        out[kind] = stats
    out["space"] = space.name
    out["seed"] = seed
    table.validation.clear()
    table.validation.update(out)
    return out


# ------------------------------------------------------------------------------------------------------ bundles
BUNDLE_README = """nasprune profiling bundle
=========================

Profiles the blocks of a {model_type} model (hidden {hidden_size}, {num_heads} heads, FFN {intermediate_size}) for
target '{target}' at precision {precision}. Needs Python >= 3.9, onnxruntime and numpy (psutil and tqdm are used
when installed). On the device:

    python run_profile.py --out table.json

An interrupted run resumes from table.json.partial.json. Copy table.json back and pass it to nasprune
(--latency-table table.json) or put it in the table cache (see docs/profiling.md).
"""


def write_bundle(dims, target, precision: str | None, dst_dir, model_config=None,
                 unit_step: int = DEFAULT_UNIT_STEP, measurement: dict | None = None, progress: bool = True) -> Path:
    """Write the micro-graphs (``graphs/*.onnx``), ``manifest.json``, ``run_profile.py`` (+ ``nasprune_session.py``)
    and a README into ``dst_dir``; returns the folder. The device needs only onnxruntime and numpy."""
    target = _target(target)
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
    here = Path(__file__).resolve().parent
    shutil.copyfile(here / "bundle_runner.py", dst / "run_profile.py")
    import targets.session

    shutil.copyfile(targets.session.__file__, dst / "nasprune_session.py")
    (dst / "README.txt").write_text(BUNDLE_README.format(target=target.name, precision=precision, **dims.to_dict()))
    return dst
