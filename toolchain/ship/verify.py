"""Checks an exported ONNX model against the sliced torch model, and measures it on the target.

* :func:`verify_onnx` -- ONNX Runtime logits vs the sliced torch model on real-ish inputs (short and long sentences in
  one padded batch, plus a full-length batch): fp32 must agree to ``1e-4`` (max absolute logit difference; ``1e-3``
  on a GPU execution provider), else
  :class:`VerificationError`; int8 / fp16 report the difference and the change of the validation metric.
* :func:`evaluate_onnx` -- the task metric of the ONNX model itself on validation data (batched, padded).
* :func:`measure_latency` -- median (and min / max / p90) of repeated runs after warm-up.
* :func:`measure_memory` -- peak memory of creating a session and running it, in a fresh, isolated Python process.

Sessions come from a target (``target.session(path)``), a plain ``session_factory(path)``, or
:func:`default_session` (CPU execution provider, one intra-op thread per physical core).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from targets.session import physical_cores

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


def default_session(onnx_path: str | Path, threads: int | None = None):
    """CPU execution provider, ``threads`` (default: physical cores) intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


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


def as_metric_data(obj, tokenizer, max_length: int) -> MetricData | None:
    """Accept a :class:`MetricData`, a ``TextDataset`` (duck-typed: ``.texts``, ``.spec``) or ``None``."""
    if obj is None or isinstance(obj, MetricData):
        return obj
    if hasattr(obj, "texts") and hasattr(obj, "spec"):
        return MetricData.from_dataset(obj, tokenizer, max_length)
    raise TypeError(f"metric_data must be a MetricData or a TextDataset, not {type(obj).__name__}")


def _batches(inputs: dict[str, np.ndarray], batch_size: int):
    """Row batches, each trimmed to the columns its attention mask uses (dynamic padding, left or right)."""
    mask = np.asarray(inputs["attention_mask"])
    n, seq = mask.shape
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        used = np.flatnonzero(mask[rows].any(axis=0))
        cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 1)
        yield {k: np.asarray(v)[rows][:, cols] for k, v in inputs.items() if np.ndim(v) == 2 and np.shape(v)[1] == seq}


def predict_onnx(session, inputs: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Logits of the ONNX model for all rows of ``inputs`` (batched, padded)."""
    outs = [session.run(["logits"], feed_for(session, b))[0] for b in _batches(inputs, batch_size)]
    return np.concatenate(outs, axis=0)


@torch.no_grad()
def predict_torch(model, inputs: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    model.eval()
    names = set(_torch_input_names(model))
    outs = []
    for b in _batches(inputs, batch_size):
        kw = {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items() if k in names}
        outs.append(model(**kw).logits.float().numpy())
    return np.concatenate(outs, axis=0)


def _torch_input_names(model) -> list[str]:
    from toolchain.onnx.build import input_names_for

    return input_names_for(model.config)


def _score(metric_data: MetricData, preds: np.ndarray) -> dict:
    out = {k: float(v) for k, v in metric_data.metric(preds, metric_data.labels).items()}
    out["num_examples"] = int(len(metric_data))
    out["name"] = metric_data.name
    return out


def evaluate_onnx(session, metric_data: MetricData, batch_size: int = 32) -> dict:
    """The task metric of the ONNX model itself; ``{"score": ..., <metrics>..., "num_examples": n}``."""
    return _score(metric_data, predict_onnx(session, metric_data.inputs, batch_size))


def evaluate_torch(model, metric_data: MetricData, batch_size: int = 32) -> dict:
    return _score(metric_data, predict_torch(model, metric_data.inputs, batch_size))


# ------------------------------------------------------------------------------------------------------ latency


def measure_latency(session, inputs: dict[str, Any], warmup: int = 10, reps: int = 50) -> dict:
    """Wall-clock latency of ``session.run`` on ``inputs``: median, min, max and p90 in ms over ``reps`` runs
    after ``warmup`` untimed runs."""
    if reps < 1:
        raise ValueError("reps must be >= 1")
    feed = feed_for(session, inputs)
    for _ in range(max(0, warmup)):
        session.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"median_ms": float(statistics.median(times)), "min_ms": float(times[0]), "max_ms": float(times[-1]),
            "p90_ms": float(p90), "reps": int(reps), "warmup": int(warmup)}


def latency_inputs(config, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Fixed-shape inputs (``batch`` x ``seq_len``, no padding) -- the shape the latency tables are measured at."""
    from toolchain.onnx.build import dummy_inputs

    return {k: v.numpy() for k, v in dummy_inputs(config, batch, seq_len).items()}


# ------------------------------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort
import psutil
args = json.loads(sys.argv[1])
proc = psutil.Process()
gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in args["providers"])
if gpu and hasattr(ort, "preload_dlls"):  # no torch here to load the CUDA libraries: let onnxruntime find them
    import contextlib, io
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls(directory="")
    except Exception:
        pass

def gpu_used():  # bytes in use on the GPU (whole device; nvidia-ml-py), or None
    if not gpu:
        return None
    try:
        import pynvml
        pynvml.nvmlInit()
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        h = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None

gpu_base = gpu_used()

def hwm():  # peak RSS of this process image (VmHWM, bytes), or the current RSS where /proc is not available
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss

base = proc.memory_info().rss
try:  # reset the high-water mark to the current RSS, so the peak below is the session's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
opts = ort.SessionOptions()
opts.intra_op_num_threads = args["threads"]
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(args["path"], sess_options=opts, providers=args["providers"])
lost = [p for p in args["providers"] if p != "CPUExecutionProvider" and p not in sess.get_providers()]
if gpu and lost:
    sys.exit("execution provider(s) " + ", ".join(lost) + " did not start in the memory-measuring process")
after_session = proc.memory_info().rss
b, s = args["batch"], args["seq_len"]
feed = {}
for i in sess.get_inputs():
    if i.name == "input_ids":
        feed[i.name] = np.full((b, s), 1000 % max(2, args["vocab"]), dtype=np.int64)
    elif i.name == "attention_mask":
        feed[i.name] = np.ones((b, s), dtype=np.int64)
    else:
        feed[i.name] = np.zeros((b, s), dtype=np.int64)
for _ in range(args["runs"]):
    sess.run(None, feed)
gpu_after = gpu_used()
print(json.dumps({"baseline_rss": base, "after_session_rss": after_session,
                  "after_run_rss": proc.memory_info().rss, "peak_rss": max(hwm(), proc.memory_info().rss),
                  "hwm_reset": reset,
                  "gpu_bytes": None if gpu_base is None or gpu_after is None else gpu_after - gpu_base}))
"""

MEMORY_METHOD = (
    "fresh isolated Python process (python -I): peak resident set size (Linux VmHWM, reset through "
    "/proc/self/clear_refs just before the session is created) while creating the ONNX Runtime session and running "
    "{runs} inferences at batch x sequence length, minus the RSS just before creating the session (after importing "
    "numpy + onnxruntime)"
)


def measure_memory(onnx_path: str | Path, *, batch: int = 1, seq_len: int = 128, threads: int | None = None,
                   providers: list[str] | None = None, vocab_size: int = 30522, runs: int = 3,
                   timeout: float = 300) -> dict:
    """Peak memory (MB = 2**20 bytes) of loading and running the model, measured in a fresh subprocess.

    ``memory_mb`` is the peak RSS of the process minus its RSS before the session existed, i.e. what the session
    (weights, arena, activations, thread pools) added: host memory, also on a GPU target (where the latency table's
    memory is host memory too). On a CUDA target ``gpu_memory_mb`` is the GPU memory in use after the runs minus
    before the session (the whole device's, read with nvidia-ml-py where it is installed; else ``None``).
    """
    args = {"path": str(Path(onnx_path).resolve()), "batch": int(batch), "seq_len": int(seq_len),
            "threads": int(threads or physical_cores()), "providers": providers or ["CPUExecutionProvider"],
            "vocab": int(vocab_size), "runs": int(runs)}
    proc = subprocess.run([sys.executable, "-I", "-c", _MEMORY_SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {proc.stderr.strip()[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 1024.0 * 1024.0
    return {
        "memory_mb": (r["peak_rss"] - r["baseline_rss"]) / mb,
        "peak_rss_mb": r["peak_rss"] / mb,
        "baseline_rss_mb": r["baseline_rss"] / mb,
        "session_rss_mb": (r["after_session_rss"] - r["baseline_rss"]) / mb,
        "peak_reset": bool(r.get("hwm_reset")),
        **({"gpu_memory_mb": r["gpu_bytes"] / mb} if r.get("gpu_bytes") is not None else {}),
        "method": MEMORY_METHOD.format(runs=runs),
    }


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
    int8 / fp16: the delta is reported, not enforced; with ``metric_data`` the torch metric is computed too and the
    change of the metric is reported (``metric_delta`` = ONNX - torch).
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
        onnx_metric = evaluate_onnx(session, metric_data, eval_batch_size)
        result["metric"] = onnx_metric
        if precision != "fp32":
            torch_metric = evaluate_torch(model, metric_data, eval_batch_size)
            result["torch_metric"] = torch_metric
            result["metric_delta"] = onnx_metric["score"] - torch_metric["score"]
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
