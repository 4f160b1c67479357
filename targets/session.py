"""Opening an ONNX Runtime session for a target, and the machine fingerprint.

This module is deliberately standalone (only the standard library, ``onnxruntime`` and optionally ``psutil``): the
profiling bundle copies it next to ``run_profile.py`` so a device without torch or nasprune computes the same
fingerprint and opens sessions exactly the way the toolchain does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import subprocess
import sys

OPT_LEVELS = ("disabled", "basic", "extended", "all")


class ProviderUnavailableError(RuntimeError):
    """The target's execution provider is not part of this onnxruntime build, or cannot start on this machine."""


#: what to install for a provider this onnxruntime build lacks
INSTALL_HINTS = {
    "CUDAExecutionProvider": "onnxruntime-gpu (pip install 'nasprune[gpu]'; see docs/scaling.md: the CPU-only "
                             "onnxruntime package must be uninstalled first)",
    "TensorrtExecutionProvider": "onnxruntime-gpu with TensorRT",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
# a one-node ONNX graph (Relu of a float[1]): opening it with a provider shows whether the provider starts here
_PROBE_MODEL = "CAg6NwoMCgF4EgF5IgRSZWx1EgVwcm9iZVoPCgF4EgoKCAgBEgQKAggBYg8KAXkSCgoICAESBAoCCAFCBAoAEA0="


def physical_cores() -> int:
    """Physical CPU cores (psutil when installed, else /proc/cpuinfo, else the logical count)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo 'model name' or ARM 'Hardware'/'CPU part', else platform)."""
    try:
        fields = {}
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields.setdefault(k.strip().lower(), v.strip())
        for key in ("model name", "hardware", "cpu model", "processor"):
            v = fields.get(key)
            if v and not v.isdigit():
                return v
        if "cpu implementer" in fields:
            return f"arm implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_threads(threads) -> int:
    """``"auto"`` -> the machine's physical cores; an int stays what it is."""
    if threads == "auto":
        return physical_cores()
    return int(threads)


def available_providers(providers, optional_providers=()) -> list[str]:
    """The provider list a session gets: optional ones where this build has them, then the required ones.

    Raises :class:`ProviderUnavailableError` when a required provider is missing from this onnxruntime build.
    """
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in providers if p not in have]
    if missing:
        hints = [INSTALL_HINTS[p] for p in missing if p in INSTALL_HINTS]
        raise ProviderUnavailableError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime {ort.__version__} build "
            f"(available: {', '.join(have)}); install "
            + ("; ".join(hints) if hints else "the matching onnxruntime package (e.g. onnxruntime-gpu for CUDA)")
        )
    chosen = [p for p in optional_providers if p in have and p not in providers]
    return chosen + [p for p in providers if p not in chosen]


def prepare_providers(providers) -> None:
    """Before a CUDA session in a process without torch: let onnxruntime load the CUDA / cuDNN libraries of the
    nvidia-* Python packages (``onnxruntime.preload_dlls``, onnxruntime >= 1.21), as importing torch would."""
    if not any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers):
        return
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and "torch" not in sys.modules:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                preload(directory="")
        except Exception:  # noqa: BLE001 - libraries on the system path work as well
            pass


def check_started(session, providers) -> None:
    """Raise :class:`ProviderUnavailableError` when a required accelerator provider did not start in ``session``:
    onnxruntime-gpu lists ``CUDAExecutionProvider`` even on a machine without a GPU, and then silently runs on the
    CPU, which would measure the wrong device."""
    active = list(session.get_providers())
    lost = [p for p in providers if p in GPU_PROVIDERS and p not in active]
    if lost:
        raise ProviderUnavailableError(
            f"execution provider(s) {', '.join(lost)} are part of this onnxruntime build but could not start on this "
            f"machine (no usable GPU, driver, or CUDA / cuDNN libraries?); onnxruntime fell back to "
            f"{', '.join(active) or 'nothing'}. Profile, export and verify for this target on a machine with the "
            f"device (or bring its latency table with --latency-table)"
        )


def probe_providers(providers, optional_providers=()) -> list[str]:
    """The providers a session would get (:func:`available_providers`), after checking that the accelerator ones
    really start here, on a one-node graph; raises :class:`ProviderUnavailableError` otherwise."""
    chosen = available_providers(providers, optional_providers)
    if any(p in GPU_PROVIDERS for p in providers):
        import base64

        import onnxruntime as ort

        prepare_providers(chosen)
        so = ort.SessionOptions()
        so.log_severity_level = 4  # the fallback warning is ours to explain
        sess = ort.InferenceSession(base64.b64decode(_PROBE_MODEL), so, providers=chosen)
        check_started(sess, providers)
    return chosen


def session_options(threads, graph_optimization_level: str = "all"):
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = resolve_threads(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[graph_optimization_level]
    so.log_severity_level = 3
    return so


def open_session(onnx_path, providers, optional_providers=(), threads="auto", graph_optimization_level="all"):
    """An ``onnxruntime.InferenceSession`` with the given provider(s), intra-op threads and optimization level."""
    import onnxruntime as ort

    chosen = available_providers(providers, optional_providers)
    prepare_providers(chosen)
    so = session_options(threads, graph_optimization_level)
    sess = ort.InferenceSession(str(onnx_path), so, providers=chosen)
    check_started(sess, providers)
    return sess


ARCHITECTURES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def architecture(name: str | None = None) -> str:
    """A CPU architecture under one name (``x86_64``, ``aarch64``, ...): ``name``, or this machine's."""
    name = (name if name is not None else platform.machine()).lower()
    return ARCHITECTURES.get(name, name)


def gpu_name() -> str:
    """The name of the (first visible) GPU: nvidia-ml-py where installed, else ``nvidia-smi``, else
    ``"unknown GPU"``."""
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    index = int(visible) if visible.isdigit() else 0
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={index}"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown GPU"


def device_fingerprint(providers, optional_providers=()) -> dict:
    """Which device runs a session with these providers: CPU model, architecture, cores, onnxruntime version, the
    provider, and the GPU's name when the provider is a GPU one. What every measured figure records as
    ``measured_on``; two figures come from the same device when :func:`same_device` says so."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    effective = [p for p in optional_providers if p in have] + list(providers)
    fp = {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "onnxruntime": ort.__version__,
        "provider": effective[0] if effective else "",
        "providers": effective,
    }
    if fp["provider"] in GPU_PROVIDERS:
        fp["gpu"] = gpu_name()
    return fp


#: the fields that say which device a fingerprint is of (not how it was set up)
DEVICE_FIELDS = ("cpu_model", "machine", "physical_cores", "provider", "gpu")


def same_device(a: dict, b: dict) -> bool:
    """Whether fingerprints ``a`` and ``b`` are of the same device (:data:`DEVICE_FIELDS` both record agree)."""
    return all(a.get(k) == b.get(k) for k in DEVICE_FIELDS if a.get(k) is not None and b.get(k) is not None)


def machine_fingerprint(providers, optional_providers=(), threads="auto", precision="fp32", batch_size=1,
                        sequence_length=128, target_name="") -> dict:
    """What a latency measurement depends on: the device (:func:`device_fingerprint`: CPU model, cores, GPU,
    onnxruntime version, provider), threads, precision, batch and sequence length."""
    device = device_fingerprint(providers, optional_providers)
    return {
        "target": target_name,
        **{k: device[k] for k in ("cpu_model", "machine", "physical_cores")},
        "threads": resolve_threads(threads),
        **{k: v for k, v in device.items() if k not in ("cpu_model", "machine", "physical_cores")},
        "precision": precision,
        "batch_size": int(batch_size),
        "sequence_length": int(sequence_length),
    }


FINGERPRINT_KEY_FIELDS = ("cpu_model", "physical_cores", "threads", "onnxruntime", "provider", "precision",
                          "batch_size", "sequence_length")


def fingerprint_key(fp: dict) -> str:
    """A short stable hash of the fields that decide whether a latency table applies (and of the GPU, on a GPU
    provider: a table keyed before GPUs were named keeps its key on a CPU)."""
    data = {k: fp.get(k) for k in FINGERPRINT_KEY_FIELDS}
    if fp.get("gpu"):
        data["gpu"] = fp["gpu"]
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
