#!/usr/bin/env python3
"""The one latency and memory meter: what profiling, the device bundle and the export measure with.

Standalone like :mod:`targets.session` (standard library, ``numpy``, ``onnxruntime``; ``psutil`` and
``nvidia-ml-py`` where installed): a profiling bundle copies it next to ``run_profile.py`` as ``nasprune_meter.py``.

* **latency** (:func:`time_session`): ``warmup`` untimed runs, then timed runs (``time.perf_counter`` around each
  ``session.run``) until at least ``min_reps`` runs and ``min_time_s`` seconds, at most ``max_reps``; the statistic
  is the **median** of the per-run wall times (``latency_ms``), with min / quartiles / p90 / max beside it.
* **memory** (:func:`measure`): ``memory_mb`` = the peak resident set size while the model serves requests minus
  the resident size just before the session was created, in **MB = 10^6 bytes**, in a fresh process: a child
  forked for the graph (:func:`measure`), or a fresh interpreter that runs :func:`measure` (:func:`measure_isolated`,
  for callers that have torch or CUDA loaded). numpy and onnxruntime (and, for a GPU provider, the CUDA libraries)
  are loaded before the baseline is read. The kernel's peak counter (``VmHWM``) is reset after the session is
  created (``/proc/self/clear_refs`` = 5), so load-time transients (the ONNX protobuf next to the initializers) do
  not count: the figure is what serving costs -- weights as ONNX Runtime holds them, its arena (activations), its
  threads. Without /proc, the resident size after the runs is used (psutil). On a GPU provider,
  ``gpu_memory_mb`` is the GPU memory in use after the runs minus before the session (the whole device's, read
  with nvidia-ml-py where installed).
* **beside the reference** (:func:`measure_beside`, :func:`measure_point`): an end-to-end figure (calibration,
  validation, export) is the median of :data:`E2E_ROUNDS` rounds, each right after a measurement of the unpruned
  network, so that the drift of a shared machine can be taken out (:func:`drift_corrected`); in a calibration or
  validation, those whose reference read more than 5 % off its usual latency are taken again at the end of the run
  (:func:`retake_disturbed`).
* **where** (``measured_on``): the device that ran the graph (:func:`targets.session.device_fingerprint`: CPU,
  cores, GPU, onnxruntime, provider), so every figure says where it was measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:  # inside nasprune
    from targets.session import GPU_PROVIDERS, device_fingerprint, open_session, prepare_providers
except ImportError:  # inside a bundle, or run as a script (python -I targets/meter.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from nasprune_session import GPU_PROVIDERS, device_fingerprint, open_session, prepare_providers  # type: ignore
    except ImportError:
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
        from targets.session import GPU_PROVIDERS, device_fingerprint, open_session, prepare_providers

MB = 1e6  # memory figures are in MB = 10^6 bytes, everywhere

DEFAULT_MEASUREMENT = {"warmup": 5, "min_reps": 15, "min_time_s": 0.3, "max_reps": 2000, "statistic": "median"}
#: exported points measured on a device (``run_profile.py --measure-points``), read by ``nasprune export --measured``
MEASURED_FORMAT = "nasprune.measured_points"
MEASURED_VERSION = 1
MEMORY_METHOD = ("peak RSS while serving (VmHWM reset after session creation via /proc/self/clear_refs) minus RSS "
                 "before session creation (numpy and onnxruntime already loaded), in a fresh process "
                 "(targets.meter.measure); MB = 1e6 bytes")


def point_key(info: dict) -> str:
    """What a measurement of an exported point is matched by (``info``: its ``nasprune.json``): the sub-network,
    the precision, the batch and the sequence length."""
    return f"{info['subnetwork_key']}-{info['precision']}-b{info['batch_size']}-s{info['sequence_length']}"


def resolved_measurement(settings: dict, measurement: dict | None = None) -> dict:
    """The timing a measurement with a target's ``settings`` uses: :data:`DEFAULT_MEASUREMENT`, under the target's
    ``[measurement]`` overrides (``settings["measurement"]``), under a caller's ``measurement``."""
    return {**DEFAULT_MEASUREMENT, **(settings.get("measurement") or {}), **(measurement or {})}


# ------------------------------------------------------------------------------------------------------ latency
def time_session(session, feed: dict, warmup: int = DEFAULT_MEASUREMENT["warmup"],
                 min_reps: int = DEFAULT_MEASUREMENT["min_reps"], min_time_s: float = DEFAULT_MEASUREMENT["min_time_s"],
                 max_reps: int = DEFAULT_MEASUREMENT["max_reps"]) -> dict:
    """Wall-clock latency of ``session.run(None, feed)`` (ms): ``latency_ms`` is the median of the timed runs."""
    if max_reps < 1:
        raise ValueError("max_reps must be >= 1")
    for _ in range(max(0, int(warmup))):
        session.run(None, feed)
    times = []
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        session.run(None, feed)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if len(times) >= max_reps or (len(times) >= min_reps and t1 - t_start >= min_time_s):
            break
    times.sort()
    n = len(times)
    return {"latency_ms": _median(times), "min_ms": times[0], "q25_ms": times[n // 4], "q75_ms": times[(3 * n) // 4],
            "p90_ms": times[max(0, -(-9 * n // 10) - 1)], "max_ms": times[-1], "reps": n, "warmup": int(warmup)}


def make_feed(input_names, batch: int, seq_len: int, vocab_size: int) -> dict:
    """Fixed-shape int64 inputs: random token ids below ``vocab_size``, an all-ones mask, zero token types."""
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {}
    for name in input_names:
        if name == "input_ids":
            feed[name] = rng.integers(5, max(6, vocab_size - 1), size=(batch, seq_len), dtype=np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((batch, seq_len), dtype=np.int64)
        else:
            feed[name] = np.zeros((batch, seq_len), dtype=np.int64)
    return feed


# ------------------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _rss() -> int:
    st = _proc_status()
    if "VmRSS" in st:
        return st["VmRSS"]
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def gpu_memory_used() -> int | None:
    """Bytes in use on the (first visible) GPU, whole device (nvidia-ml-py), or ``None``."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        h = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        return None


def measure_here(onnx_path, settings: dict, vocab_size: int, measurement: dict | None = None) -> dict:
    """Latency and memory of ``onnx_path`` in *this* process (see the module docstring); prefer :func:`measure`.

    ``settings``: a target's settings (``Target.settings()``): ``providers``, ``optional_providers``,
    ``intra_op_threads``, ``graph_optimization_level``, ``batch_size``, ``sequence_length``, and ``measurement``
    (the target's overrides of :data:`DEFAULT_MEASUREMENT`, where it has any); ``measurement`` overrides both."""
    import numpy  # noqa: F401 - loaded before the baseline: not part of the model's memory
    import onnxruntime  # noqa: F401

    m = resolved_measurement(settings, measurement)
    providers = list(settings.get("providers") or ["CPUExecutionProvider"])
    gpu = any(p in GPU_PROVIDERS for p in providers)
    if gpu:
        prepare_providers(providers)  # the CUDA libraries are the runtime's, not the model's
    gpu_base = gpu_memory_used() if gpu else None
    base = _rss()
    sess = open_session(onnx_path, providers, settings.get("optional_providers", ()),
                        settings.get("intra_op_threads", "auto"), settings.get("graph_optimization_level", "all"))
    loaded = _rss()
    peak_ok = _reset_peak()
    feed = make_feed([i.name for i in sess.get_inputs()], settings.get("batch_size", 1),
                     settings.get("sequence_length", 128), vocab_size)
    result = time_session(sess, feed, m["warmup"], m["min_reps"], m["min_time_s"], m["max_reps"])
    peak = _proc_status().get("VmHWM", 0) if peak_ok else _rss()
    gpu_after = gpu_memory_used() if gpu_base is not None else None
    result.update(memory_mb=max(peak - base, 0) / MB, loaded_mb=max(loaded - base, 0) / MB,
                  baseline_rss_mb=base / MB, peak_rss_mb=peak / MB, peak_reset=peak_ok)
    if gpu_after is not None:
        result["gpu_memory_mb"] = (gpu_after - gpu_base) / MB
    result["measured_on"] = device_fingerprint(sess.get_providers())  # where these figures come from
    return result


def measure(onnx_path, settings: dict, vocab_size: int, measurement: dict | None = None) -> dict:
    """Latency (median, ms) and memory (MB = 10^6 bytes) of one ONNX graph with the target's session settings.

    On POSIX the measurement runs in a child forked for this graph, so every graph starts from the same resident
    baseline and nothing of the previous one stays resident."""
    import numpy  # noqa: F401 - once here rather than in every child
    import onnxruntime  # noqa: F401

    if not hasattr(os, "fork"):
        return measure_here(onnx_path, settings, vocab_size, measurement)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            payload = json.dumps(measure_here(onnx_path, settings, vocab_size, measurement))
        except BaseException as e:  # report, never return into the parent's code
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
            code = 1
        with os.fdopen(w, "w") as fh:
            fh.write(payload)
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    try:
        result = json.loads(data)
    except json.JSONDecodeError:
        raise RuntimeError(f"measuring {onnx_path} crashed the measuring process") from None
    if "error" in result:
        raise RuntimeError(f"measuring {onnx_path} failed: {result['error']}")
    return result


# ------------------------------------------------------------------------------- beside the unpruned reference
#: rounds of an end-to-end measurement that alternates with the unpruned reference (calibration, validation, export);
#: the figure is the median of the rounds: one window of ``min_time_s`` is at the mercy of a shared machine
E2E_ROUNDS = 3


def _median(values) -> float:
    v = sorted(values)
    n = len(v)
    return float(v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]))


def measure_beside(measure_one, path, reference=None, rounds: int = E2E_ROUNDS) -> dict:
    """``measure_one(path)`` (a meter result) in ``rounds`` rounds, each right after ``measure_one(reference)``, the
    unpruned network: both see the same machine speed, so drift of a shared machine can be told apart from the
    difference between the two (:func:`drift_corrected`). The result is the first round's, with ``latency_ms`` the
    median of the rounds (all in ``rounds_ms``), ``reference_ms`` the median of the reference's rounds (all in
    ``reference_rounds_ms``). ``reference=None``: ``path`` is the reference itself (its rounds are both)."""
    refs, runs = [], []
    for _ in range(max(1, int(rounds))):
        if reference is not None:
            refs.append(measure_one(reference)["latency_ms"])
        runs.append(measure_one(path))
    out = dict(runs[0])
    lat = [r["latency_ms"] for r in runs]
    refs = refs or lat
    out.update(latency_ms=_median(lat), rounds_ms=lat, reference_ms=_median(refs), reference_rounds_ms=refs)
    return out


def drift_corrected(measured, reference, speed_ms: float) -> list:
    """Latencies rescaled to the machine speed at which the unpruned network takes ``speed_ms``: each measurement
    times ``speed_ms / reference`` (its own side-by-side measurement of the unpruned network)."""
    return [m * speed_ms / r for m, r in zip(measured, reference)]


def paired_ratio(result: dict) -> float:
    """A measurement beside the reference (:func:`measure_beside`) as a ratio to it: the median over the rounds of
    (the point's reading / the unpruned network's reading just before it); without rounds, the ratio of the two.
    Each reading is paired with the reference that saw the same machine; the ratio of the two medians can pair a
    quiet reading of one with a disturbed reading of the other (in one export a point read 6.9, 6.8 and 6.4 ms beside
    10.6, 9.5 and 9.5 ms: 7.03 ms drift-corrected by the medians, 6.65 ms paired, 6.38 ms predicted)."""
    rounds, refs = result.get("rounds_ms"), result.get("reference_rounds_ms")
    if not (rounds and refs and len(rounds) == len(refs)):
        rounds, refs = [result["latency_ms"]], [result["reference_ms"]]
    return _median([m / r for m, r in zip(rounds, refs)])


def paired_drift_corrected(result: dict, speed_ms: float) -> float:
    """``result`` at the machine speed at which the unpruned network takes ``speed_ms``: ``speed_ms`` x
    :func:`paired_ratio`."""
    return speed_ms * paired_ratio(result)


def quiet_latency(readings) -> float:
    """The unpruned network's latency on the machine undisturbed, from its readings in one run: their 10th
    percentile. A busy shared machine only ever slows a run down, and it can stay busy for most of a run (in one
    bench_latency run, 12 of 16 calibration readings were 37 % slower than the other 4), where the median would
    take the busy speed for the usual one."""
    import numpy as np

    return float(np.percentile(np.asarray(readings, float), 10))


#: a machine on which one network's readings repeat within ±5 % of their median less often than this is busy: the
#: share that bench_latency's goal asks of predictions, which no predictor can show against such readings
STEADY_SHARE = 0.8


def repeatability(readings, tolerance: float = 0.05) -> float:
    """The share of ``readings`` (one network's latencies, e.g. the unpruned network's beside every sample of a
    table) within ``tolerance`` (relative) of their own median: how steady the machine was. Where it is low, no
    prediction can be checked to within ``tolerance`` on that machine."""
    import numpy as np

    v = np.asarray(readings, float)
    return float(np.mean(np.abs(v / np.median(v) - 1) <= tolerance)) if v.size else float("nan")


#: a measurement beside the reference whose reference read more than this far off the unpruned network's usual
#: latency at that length (:func:`quiet_latency` of the run's readings) was taken while the machine was disturbed
QUIET_TOLERANCE = 0.05
#: how many times such a measurement is taken again, at the end of the run (:func:`retake_disturbed`)
QUIET_PASSES = 2
#: a pass of retakes that brought less than this share of its measurements within the tolerance ends the retakes:
#: the machine is busy for longer than the run, and another pass would take as long for as little (in a profile on
#: the busy shared host, the first pass brought 2 of 15 calibration and 5 of 24 validation measurements within it,
#: and the second pass took another minute each)
QUIET_MIN_SETTLED = 0.5


def disturbed(reference_ms: float, usual_ms: float, tolerance: float = QUIET_TOLERANCE) -> bool:
    """Whether a measurement was taken while the machine was disturbed: the unpruned network read beside it
    (``reference_ms``) more than ``tolerance`` off its usual latency ``usual_ms``, either way. The one criterion of
    the retakes (:func:`retake_disturbed`, the export's :func:`toolchain.ship.verify.measure_exported`) and of
    judging a reading by its drift-corrected figure (:func:`toolchain.ship.selection.disturbed_reading`)."""
    return abs(reference_ms / usual_ms - 1.0) > tolerance


def retake_disturbed(results: dict, measure_again, group=lambda key: None, tolerance: float = QUIET_TOLERANCE,
                     passes: int = QUIET_PASSES, on_retake=None, min_settled: float = QUIET_MIN_SETTLED) -> int:
    """Take again the measurements of a run that were made while the machine was disturbed.

    ``results``: ``{key: result of measure_beside}``, one run's (a calibration, a validation); ``group(key)``: the
    keys whose reference readings are comparable (the sequence length). A result whose ``reference_ms`` is more than
    ``tolerance`` off its group's usual reference latency (:func:`quiet_latency` of the group's readings) is
    measured again with ``measure_again(keys)`` (``{key: new result}``, the disturbed keys of one pass, so a caller
    can build each graph once), up to ``passes`` times, and the result whose reference is closest to the usual
    latency is kept; a pass that brought less than ``min_settled`` of its measurements within the tolerance is the
    last (the machine stays busy). Why not only rescale (:func:`drift_corrected`): a busy shared machine does not slow every
    network alike (operators split across threads wait for a preempted one, more or less depending on their size),
    so a measurement taken under contention is off even after rescaling; contention comes in bursts of minutes, so
    the retake waits until the rest of the run is measured. Each kept result records ``disturbed_ms``, the reference
    readings of the discarded measurements, and ``retaken``. Returns how many measurements were taken again."""
    readings: dict = {}
    for k, r in results.items():
        readings.setdefault(group(k), []).extend(r.get("reference_rounds_ms") or [r["reference_ms"]])
    usual = {g: quiet_latency(v) for g, v in readings.items()}

    def off(k, r):
        return abs(r["reference_ms"] / usual[group(k)] - 1.0)

    n = 0
    for _ in range(max(0, int(passes))):
        todo = [k for k, r in results.items() if disturbed(r["reference_ms"], usual[group(k)], tolerance)]
        if not todo:
            break
        if on_retake:
            on_retake(len(todo))
        again = measure_again(todo)
        for k in todo:
            old, new = results[k], again[k]
            keep, drop = (new, old) if off(k, new) < off(k, old) else (old, new)
            results[k] = {**keep, "disturbed_ms": old.get("disturbed_ms", []) + [drop["reference_ms"]],
                          "retaken": old.get("retaken", 0) + 1}
            n += 1
        if sum(not disturbed(results[k]["reference_ms"], usual[group(k)], tolerance) for k in todo) \
                < min_settled * len(todo):
            break
    return n


def measure_point(onnx_path, settings: dict, vocab_size: int, measurement: dict | None = None, reference=None,
                  rounds: int = E2E_ROUNDS, lengths=()) -> dict:
    """An exported model as the export measures it: :func:`measure_beside` the ``reference`` ONNX (the unpruned
    model; ``None``: this model is the reference) at the settings' sequence length, then one round at each of
    ``lengths`` (model and reference alternating), in ``by_length``: ``{length: {"latency_ms", "reference_ms"}}``.
    Every graph is measured by :func:`measure` (a child forked for it)."""
    def at(length):
        s = dict(settings) if length is None else {**settings, "sequence_length": int(length)}
        return lambda p: measure(p, s, vocab_size, measurement)

    out = measure_beside(at(None), onnx_path, reference, rounds)
    by_length = {}
    for length in lengths:
        r = measure_beside(at(length), onnx_path, reference, 1)
        by_length[str(int(length))] = {"latency_ms": r["latency_ms"], "reference_ms": r["reference_ms"]}
    if by_length:
        out["by_length"] = by_length
    return out


def measure_isolated(onnx_path, settings: dict, vocab_size: int, measurement: dict | None = None,
                     timeout: float = 600, **point) -> dict:
    """:func:`measure` in a fresh interpreter (``python -I targets/meter.py``): for a caller that has torch, CUDA or
    large buffers loaded (the export), whose own process would not give a clean baseline. With ``point`` (the
    keywords ``reference``, ``rounds``, ``lengths`` of :func:`measure_point`): :func:`measure_point` there."""
    req = {"path": str(Path(onnx_path).resolve()), "settings": settings, "vocab_size": int(vocab_size),
           "measurement": measurement}
    graphs = 1  # ``timeout`` is per graph measured
    if point:
        ref, lengths = point.get("reference"), [int(n) for n in point.get("lengths") or ()]
        req["point"] = {**point, "reference": str(Path(ref).resolve()) if ref is not None else None, "lengths": lengths}
        graphs = 2 * (int(point.get("rounds") or E2E_ROUNDS) + len(lengths))
    proc = subprocess.run([sys.executable, "-I", str(Path(__file__).resolve()), json.dumps(req)],
                          capture_output=True, text=True, timeout=timeout * graphs)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {onnx_path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    req = json.loads((argv or sys.argv[1:])[0])
    args = (req["path"], req["settings"], req["vocab_size"], req.get("measurement"))
    print(json.dumps(measure_point(*args, **req["point"]) if req.get("point") else measure(*args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
