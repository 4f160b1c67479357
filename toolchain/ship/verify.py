"""Checks an exported ONNX model against the sliced torch model, and measures it on the target.

* :func:`verify_onnx` -- ONNX Runtime logits vs the sliced torch model on real-ish inputs (short and long sentences in
  one padded batch, plus a full-length batch): fp32 must agree to ``1e-4`` (max absolute logit difference; ``1e-3``
  on a GPU execution provider), else
  :class:`VerificationError`; int8 / fp16 report the difference and the change of the validation metric.
* :func:`evaluate_onnx` -- the task metric of the ONNX model itself on validation data (batched, padded).
* :func:`measure_latency` -- median (and min / quartiles / p90 / max) of repeated runs after warm-up.
* :func:`measure_memory` -- memory (MB = 10^6 bytes) the model adds while it serves, in a fresh Python process.
* :func:`measure_exported` -- what the export measures: latency in rounds alternating with the unpruned model
  (:class:`Reference`) and drift-corrected, latency at other sequence lengths, memory; one fresh Python process.

Both are :mod:`targets.meter`, the meter that profiles the latency tables, so measured and predicted figures are
the same quantities. Sessions come from a target (``target.session(path)``), a plain ``session_factory(path)``, or
:func:`default_session` (CPU execution provider, one intra-op thread per physical core); all but a caller's own
factory are :func:`targets.session.open_session`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from targets.meter import (E2E_ROUNDS, MEMORY_METHOD, disturbed, measure_isolated, paired_drift_corrected,
                          time_session)
from targets.session import device_fingerprint, open_session as open_target_session, physical_cores

FP32_TOLERANCE = 1e-4
# fp32 on a GPU execution provider: its kernels (fused attention, reductions in another order, TF32 matrix
# products where the GPU has them) round differently from PyTorch on the CPU; MiniLM on an H100 with
# onnxruntime-gpu 1.31 differed by 1.2e-4 (docs/scaling.md)
FP32_GPU_TOLERANCE = 1e-3

# Real-ish sentences of very different lengths, so that a batch of them is padded.
SAMPLE_TEXTS = (
    "a gripping, beautifully acted film.",
    "The movie was long, the plot made little sense and I left before the end, which I rarely do.",
    "ok",
    "Although the first half drags, the second half more than makes up for it with a clever, surprising twist "
    "that recasts everything you have seen so far in a new light.",
)
SAMPLE_PAIRS = ("Is it any good?", "Who wrote it?", "Really?", "What do the critics say about the ending?")


class VerificationError(RuntimeError):
    """The exported model does not compute what the sliced model computes."""


# ----------------------------------------------------------------------------------------------------- sessions
CPU_PROVIDERS = ("CPUExecutionProvider",)


def default_session(onnx_path: str | Path, threads: int | None = None):
    """CPU execution provider, ``threads`` (default: physical cores) intra-op threads, all graph optimizations."""
    return open_target_session(onnx_path, CPU_PROVIDERS, threads=threads or "auto")


def open_session(onnx_path: str | Path, target=None, session_factory: Callable | None = None):
    """A session for ``onnx_path``: ``session_factory(path)``, else ``target.session(path)``, else the CPU default."""
    if session_factory is not None:
        return session_factory(str(onnx_path))
    if target is not None and hasattr(target, "session"):
        return target.session(str(onnx_path))
    return default_session(onnx_path)


def target_threads(target=None, session=None) -> int:
    """Intra-op threads the session runs with (the target's, else the physical cores)."""
    if target is None:
        return physical_cores()
    n = getattr(target, "threads", None)  # targets.Target resolves "auto" here
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(target, "intra_op_threads", None)
    if isinstance(n, int) or (isinstance(n, str) and n.isdigit()):
        return max(1, int(n))
    return physical_cores()  # "auto" or unset


def target_providers(target=None, session=None) -> list[str]:
    if session is not None:
        try:
            return list(session.get_providers())
        except Exception:  # pragma: no cover
            pass
    return ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------------------- inputs


def session_input_names(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


def feed_for(session, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays the session takes, as int64 numpy (missing ``token_type_ids`` become zeros)."""
    feed = {}
    ref = None
    for name in session_input_names(session):
        if name in inputs:
            v = inputs[name]
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            feed[name] = v.astype(np.int64, copy=False)
            ref = feed[name]
    for name in session_input_names(session):
        if name not in feed:
            if name == "token_type_ids" and ref is not None:
                feed[name] = np.zeros_like(ref)
            else:
                raise KeyError(f"the ONNX model needs input '{name}', which was not given")
    return feed


def verification_batches(tokenizer, config, seq_len: int = 128) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Named input batches: one padded batch of real-ish sentences (and sentence pairs), one full-length batch."""
    out = []
    enc = tokenizer(list(SAMPLE_TEXTS), padding=True, truncation=True, max_length=seq_len, return_tensors="np")
    out.append(("padded_sentences", dict(enc)))
    enc = tokenizer(list(SAMPLE_TEXTS), list(SAMPLE_PAIRS), padding=True, truncation=True, max_length=seq_len,
                    return_tensors="np")
    out.append(("padded_pairs", dict(enc)))
    long_text = " ".join(SAMPLE_TEXTS * 8)
    enc = tokenizer([long_text, SAMPLE_TEXTS[0]], padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="np")
    out.append(("full_length", dict(enc)))
    return out


# ----------------------------------------------------------------------------------------------- metric data


@dataclass
class MetricData:
    """Tokenized validation data and how to score it.

    ``inputs``: padded int arrays (``input_ids``, ``attention_mask``, maybe ``token_type_ids``), ``labels``: one per
    row, ``metric(predictions, labels) -> dict`` with the main metric under ``"score"``.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    metric: Callable[[np.ndarray, np.ndarray], dict]
    name: str = "score"
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_dataset(cls, dataset, tokenizer, max_length: int = 128) -> "MetricData":
        """From a :class:`toolchain.core.data.TextDataset` (uses ``toolchain.core.data.tokenize`` / ``compute_metrics``)."""
        from toolchain.core import data

        enc = data.tokenize(dataset, tokenizer, max_length=max_length)
        labels = enc.pop("labels").numpy()
        spec = dataset.spec
        return cls(
            inputs={k: v.numpy() for k, v in enc.items()}, labels=labels,
            metric=lambda p, y: data.compute_metrics(spec, p, y), name=spec.metric, source=str(dataset.source),
        )


    def first_part(self) -> tuple["MetricData", tuple[int, int]]:
        """The rows of the first of ``extra["selection"]["parts"]`` (dev: :func:`toolchain.heldout.selection_data`)
        and their ``[start, stop)``; without parts, all rows."""
        parts = (self.extra.get("selection") or {}).get("parts") or {}
        if not parts:
            return self, (0, len(self))
        a, b = next(iter(parts.values()))
        return replace(self, inputs={k: np.asarray(v)[a:b] for k, v in self.inputs.items()}, labels=self.labels[a:b],
                       extra={}), (int(a), int(b))

    def constant_score(self) -> float:
        """The main metric of a model that ignores its input, on these labels: scikit-learn's ``DummyClassifier``
        (always the most frequent label) or, for float labels, ``DummyRegressor`` (always their mean, a correlation
        of 0). What a shipped point must clearly beat to be of any use."""
        from sklearn.dummy import DummyClassifier, DummyRegressor

        y = np.asarray(self.labels).reshape(-1)
        dummy = DummyRegressor() if np.issubdtype(y.dtype, np.floating) else DummyClassifier(strategy="most_frequent")
        x = np.zeros((len(y), 1))
        return float(self.metric(dummy.fit(x, y).predict(x), y)["score"])


def as_metric_data(obj, tokenizer, max_length: int) -> MetricData | None:
    """Accept a :class:`MetricData`, a ``TextDataset`` (duck-typed: ``.texts``, ``.spec``) or ``None``."""
    if obj is None or isinstance(obj, MetricData):
        return obj
    if hasattr(obj, "texts") and hasattr(obj, "spec"):
        return MetricData.from_dataset(obj, tokenizer, max_length)
    raise TypeError(f"metric_data must be a MetricData or a TextDataset, not {type(obj).__name__}")


def _batches(inputs: dict[str, np.ndarray], batch_size: int):
    """``(rows, batch)``: batches of rows of similar length (sorted by their attention masks, so they pad little),
    each trimmed to the columns its attention mask uses (dynamic padding, left or right)."""
    mask = np.asarray(inputs["attention_mask"])
    n, seq = mask.shape
    order = np.argsort(mask.sum(axis=1), kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        used = np.flatnonzero(mask[rows].any(axis=0))
        cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 1)
        yield rows, {k: np.asarray(v)[rows][:, cols] for k, v in inputs.items()
                     if np.ndim(v) == 2 and np.shape(v)[1] == seq}


def _in_order(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-batch outputs ``(rows, values)`` put back in the rows' order."""
    rows = np.concatenate([r for r, _ in parts])
    out = np.concatenate([v for _, v in parts], axis=0)
    return out[np.argsort(rows)]


def predict_onnx(session, inputs: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Logits of the ONNX model for all rows of ``inputs`` (batched by length, padded), in their order."""
    return _in_order([(rows, session.run(["logits"], feed_for(session, b))[0])
                      for rows, b in _batches(inputs, batch_size)])


@torch.no_grad()
def predict_torch(model, inputs: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    model.eval()
    names = set(_torch_input_names(model))
    outs = []
    for rows, b in _batches(inputs, batch_size):
        kw = {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items() if k in names}
        outs.append((rows, model(**kw).logits.float().numpy()))
    return _in_order(outs)


def _torch_input_names(model) -> list[str]:
    from toolchain.onnx.build import input_names_for

    return input_names_for(model.config)


def _score(metric_data: MetricData, preds: np.ndarray) -> dict:
    """The metric of ``preds``; with parts (``metric_data.extra["selection"]``,
    :func:`toolchain.heldout.selection_data`) each part's too, in ``parts``, and the draw in ``selection``."""
    out = {k: float(v) for k, v in metric_data.metric(preds, metric_data.labels).items()}
    out["num_examples"] = int(len(metric_data))
    out["name"] = metric_data.name
    selection = metric_data.extra.get("selection")
    if selection:
        out["parts"] = {name: {"score": float(metric_data.metric(preds[a:b], metric_data.labels[a:b])["score"]),
                               "num_examples": b - a} for name, (a, b) in selection["parts"].items()}
        out["selection"] = {k: v for k, v in selection.items() if k != "parts"}
    return out


def evaluate_onnx(session, metric_data: MetricData, batch_size: int = 32) -> dict:
    """The task metric of the ONNX model itself; ``{"score": ..., <metrics>..., "num_examples": n}``."""
    return _score(metric_data, predict_onnx(session, metric_data.inputs, batch_size))


def evaluate_torch(model, metric_data: MetricData, batch_size: int = 32) -> dict:
    return _score(metric_data, predict_torch(model, metric_data.inputs, batch_size))


# ------------------------------------------------------------------------------------------------------ latency


def measure_latency(session, inputs: dict[str, Any], warmup: int = 10, reps: int = 50) -> dict:
    """Wall-clock latency of ``session.run`` on ``inputs`` (:func:`targets.meter.time_session`): ``latency_ms`` (the
    median), ``min_ms``, ``q25_ms``, ``q75_ms``, ``p90_ms``, ``max_ms`` over ``reps`` runs after ``warmup`` untimed
    runs, and ``measured_on``: the device that ran them (:func:`targets.session.device_fingerprint`)."""
    if reps < 1:
        raise ValueError("reps must be >= 1")
    result = time_session(session, feed_for(session, inputs), warmup=warmup, min_reps=reps, min_time_s=0.0,
                          max_reps=reps)
    if hasattr(session, "get_providers"):
        result["measured_on"] = device_fingerprint(session.get_providers())  # where the figure comes from
    return result


def latency_inputs(config, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Fixed-shape inputs (``batch`` x ``seq_len``, no padding) -- the shape the latency tables are measured at."""
    from toolchain.onnx.build import dummy_inputs

    return {k: v.numpy() for k, v in dummy_inputs(config, batch, seq_len).items()}


# ------------------------------------------------------------------------------------------------------- memory
#: what ``nasprune.json`` keeps of a meter result (:func:`measure_exported`)
LATENCY_KEYS = ("latency_ms", "min_ms", "q25_ms", "q75_ms", "p90_ms", "max_ms", "reps", "warmup", "rounds_ms",
                "measured_on")
MEMORY_KEYS = ("loaded_mb", "baseline_rss_mb", "peak_rss_mb", "peak_reset", "gpu_memory_mb", "measured_on")


def measure_memory(onnx_path: str | Path, *, batch: int = 1, seq_len: int = 128, threads: int | None = None,
                   providers: list[str] | None = None, vocab_size: int = 30522, graph_optimization_level: str = "all",
                   timeout: float = 600) -> dict:
    """Memory the model adds while it serves (``memory_mb``, MB = 10^6 bytes), measured in a fresh Python process by
    :func:`targets.meter.measure`, the function that measures the latency tables' memory.

    ``memory_mb`` is the peak RSS while the session runs minus the RSS before the session existed: host memory, also
    on a GPU target (where the latency table's memory is host memory too). On a GPU target ``gpu_memory_mb`` is the
    GPU memory in use after the runs minus before the session (the whole device's, read with nvidia-ml-py where it
    is installed).
    """
    settings = {"providers": list(providers or CPU_PROVIDERS), "intra_op_threads": int(threads or physical_cores()),
                "graph_optimization_level": graph_optimization_level, "batch_size": int(batch),
                "sequence_length": int(seq_len)}
    r = measure_isolated(onnx_path, settings, vocab_size, timeout=timeout)
    return {**{k: r[k] for k in ("memory_mb", *MEMORY_KEYS) if k in r}, "method": MEMORY_METHOD}


# ------------------------------------------------------------------------------------- an exported point, whole
@dataclass(frozen=True)
class Reference:
    """The unpruned model an exported point is measured beside, round after round (:func:`measure_exported`)."""

    onnx: Path | None  # its ONNX file; None: the exported model is the unpruned one (its own reference)
    speed_ms: float | None = None  # the unpruned network's latency when the latency table was calibrated
    rounds: int = E2E_ROUNDS
    name: str = "unpruned"  # what nasprune.json calls it


def meter_settings(target=None, session=None, batch: int = 1, seq_len: int = 128) -> dict:
    """The session settings :mod:`targets.meter` measures with: the target's (providers, threads, optimization
    level), else the session's providers with one thread per physical core; at ``batch`` x ``seq_len``."""
    if target is not None and hasattr(target, "settings"):
        return {**target.settings(), "batch_size": int(batch), "sequence_length": int(seq_len)}
    return {"providers": target_providers(target, session), "intra_op_threads": target_threads(target),
            "graph_optimization_level": getattr(target, "graph_optimization_level", "all"), "batch_size": int(batch),
            "sequence_length": int(seq_len)}


def measure_exported(onnx_path: str | Path, settings: dict, vocab_size: int, *, latency: bool = True,
                     memory: bool = True, measurement: dict | None = None, reference: Reference | None = None,
                     lengths=(), timeout: float = 600, retakes: int = 1) -> dict:
    """An exported model's figures for ``nasprune.json["measured"]``, all from one fresh interpreter running
    :func:`targets.meter.measure_point` (the meter of the latency tables): latency at the settings' length, in
    ``reference.rounds`` rounds alternating with the unpruned ``reference`` (one round without it), and its
    drift-corrected figure (``speed_ms`` x the median of the rounds' ratios to the reference read just before each,
    :func:`targets.meter.paired_drift_corrected`, where ``speed_ms`` is known);
    latency at each of ``lengths`` (one round, beside the reference); memory (the first round's).

    A measurement whose reference read more than :data:`~targets.meter.QUIET_TOLERANCE` off ``speed_ms`` was taken
    while the machine was disturbed (:func:`targets.meter.disturbed`; a busy machine does not slow every network
    alike, so rescaling alone leaves it off): the latency at the settings' length is taken again, up to ``retakes``
    times, and the one whose reference is closest to ``speed_ms`` is kept (``reference.disturbed_ms``: the discarded
    references; ``retaken``). ``reference.disturbed`` says whether the kept one was still disturbed."""
    rounds = reference.rounds if latency and reference is not None else 1
    r = measure_isolated(onnx_path, settings, vocab_size, measurement, timeout, rounds=rounds,
                         reference=reference.onnx if latency and reference is not None else None,
                         lengths=list(lengths) if latency else [])
    speed = reference.speed_ms if latency and reference is not None else None

    def off(m: dict) -> float:  # how far the reference read from the calibration's speed
        return abs(m["reference_ms"] / speed - 1.0)

    discarded: list[float] = []
    for _ in range(retakes if speed else 0):
        if not disturbed(r["reference_ms"], speed):
            break
        again = measure_isolated(onnx_path, settings, vocab_size, measurement, timeout, rounds=rounds,
                                 reference=reference.onnx)
        keep, drop = (again, r) if off(again) < off(r) else (r, again)
        discarded.append(drop["reference_ms"])
        r = {**r, **{k: keep[k] for k in ("latency_ms", "reference_ms", "rounds_ms", "reference_rounds_ms",
                                          *LATENCY_KEYS) if k in keep}}
    out: dict[str, Any] = {"latency_ms": None, "memory_mb": None}
    if latency:
        out.update(latency_ms=r["latency_ms"], latency={k: r[k] for k in LATENCY_KEYS if k in r})
        if reference is not None:
            out["latency_drift_corrected_ms"] = paired_drift_corrected(r, speed) if speed else None
            out["reference"] = {"model": reference.name if reference.onnx else "itself",
                                "latency_ms": r["reference_ms"], "rounds_ms": r["reference_rounds_ms"],
                                "speed_ms": speed,
                                "disturbed": bool(speed) and disturbed(r["reference_ms"], speed),
                                **({"disturbed_ms": discarded, "retaken": len(discarded)} if discarded else {})}
        if r.get("by_length"):
            by_length = {**r["by_length"], str(settings["sequence_length"]): r}
            order = sorted(by_length, key=int)
            out["latency_by_length_ms"] = {n: by_length[n]["latency_ms"] for n in order}
            if reference is not None and reference.onnx is not None:  # (the unpruned model's own: the same)
                out["reference"]["latency_by_length_ms"] = {n: by_length[n]["reference_ms"] for n in order}
    if memory:
        out.update(memory_mb=r["memory_mb"], memory={**{k: r[k] for k in MEMORY_KEYS if k in r},
                                                     "method": MEMORY_METHOD})
    return out


# ------------------------------------------------------------------------------------------------- verification


@torch.no_grad()
def max_logit_delta(session, model, batches: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, float]:
    """Max |ONNX - torch| logit difference per named batch."""
    model.eval()
    names = set(_torch_input_names(model))
    out = {}
    for name, inputs in batches:
        got = session.run(["logits"], feed_for(session, inputs))[0]
        kw = {k: torch.from_numpy(np.asarray(v).astype(np.int64)) for k, v in inputs.items() if k in names}
        ref = model(**kw).logits.float().numpy()
        if got.shape != ref.shape:
            raise VerificationError(f"{name}: ONNX logits have shape {got.shape}, torch {ref.shape}")
        out[name] = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    return out


def verify_onnx(session, model, tokenizer, *, precision: str = "fp32", seq_len: int = 128,
                metric_data: MetricData | None = None, tolerance: float = FP32_TOLERANCE,
                reference_model=None, eval_batch_size: int = 32) -> dict:
    """Compare the ONNX model (``session``) with the sliced torch ``model``.

    fp32: max |delta| over all verification batches must be <= ``tolerance`` (raises :class:`VerificationError`).
    int8 / fp16: the delta is reported, not enforced; with ``metric_data`` the torch metric is computed too, on its
    first part (dev, :meth:`MetricData.first_part`), and the change of the metric there (``metric_delta`` = ONNX -
    torch).
    ``reference_model`` (the masked super-network, optional) is compared with ``model`` as well (torch vs torch).
    Returns a dict for ``nasprune.json["verification"]`` (+ ``"metric"`` when ``metric_data`` is given).
    """
    batches = verification_batches(tokenizer, model.config, seq_len)
    deltas = max_logit_delta(session, model, batches)
    worst = max(deltas.values())
    result: dict[str, Any] = {
        "reference": "sliced torch model (fp32)",
        "inputs": {name: list(np.shape(b["input_ids"])) for name, b in batches},
        "max_abs_logit_delta": worst,
        "max_abs_logit_delta_per_batch": deltas,
        "tolerance": tolerance if precision == "fp32" else None,
        "enforced": precision == "fp32",
    }
    if reference_model is not None:
        result["masked_vs_sliced_max_abs"] = _masked_vs_sliced(reference_model, model, batches)
    if metric_data is not None:
        preds = predict_onnx(session, metric_data.inputs, eval_batch_size)
        result["metric"] = _score(metric_data, preds)
        if precision != "fp32":  # what the precision costs, on the first part (dev) only: a diagnostic
            part, (a, b) = metric_data.first_part()
            torch_metric = evaluate_torch(model, part, eval_batch_size)
            result["torch_metric"] = torch_metric
            result["metric_delta"] = _score(part, preds[a:b])["score"] - torch_metric["score"]
    passed = precision != "fp32" or worst <= tolerance
    result["passed"] = bool(passed)
    if not passed:
        raise VerificationError(
            f"ONNX logits differ from the sliced torch model by {worst:.3g} > {tolerance:g} ({deltas})"
        )
    return result


@torch.no_grad()
def _masked_vs_sliced(reference, sliced, batches) -> float:
    """``reference`` is a callable ``(**inputs) -> output with .logits`` (e.g. a masked super-network partial)."""
    names = set(_torch_input_names(sliced))
    worst = 0.0
    for _, inputs in batches:
        kw = {k: torch.from_numpy(np.asarray(v).astype(np.int64)) for k, v in inputs.items() if k in names}
        a = reference(**kw).logits.float()
        b = sliced(**kw).logits.float()
        worst = max(worst, float((a - b).abs().max()))
    return worst
