"""Target devices: what a latency is measured on, and how an ONNX Runtime session is opened there.

A target is a small TOML file (``targets/cpu.toml``, ``cuda.toml``, ``arm64.toml`` ship with the package; a user
passes a path to their own)::

    name = "cpu"
    providers = ["CPUExecutionProvider"]            # required; first available one is the fingerprint's provider
    optional_providers = ["XnnpackExecutionProvider"]  # optional; used where this onnxruntime build has them
    batch_size = 1
    sequence_length = 128
    precisions = ["fp32", "int8"]                   # first = default
    intra_op_threads = "auto"                       # "auto" = physical cores, or an integer >= 1
    graph_optimization_level = "all"                # all | extended | basic | disabled
    architecture = "aarch64"                        # optional: the device's CPU (x86_64, aarch64, ...); a machine
                                                    # of another architecture refuses to profile it (use a bundle)

    [measurement]                                   # optional: how long each latency measurement is
    warmup = 5                                      # untimed runs first
    min_reps = 15                                   # then at least this many timed runs
    min_time_s = 0.3                                # and at least this long (seconds)
    max_reps = 2000                                 # at most this many timed runs

The ``[measurement]`` table overrides :data:`targets.meter.DEFAULT_MEASUREMENT` (the values above) for every
latency this target's figures come from: the profile's micro-graphs, the calibration and validation sub-networks,
the export's measurements, and a bundle on the device. A longer window costs time and steadies a noisy device's
readings; it does not change what is measured, so a compile uses a cached table as it is when it changes
(``nasprune-profile`` measures the table anew).

Usage::

    target = load_target("cpu")
    sess = target.session("model.onnx")
    fp = target.fingerprint("int8"); key = fingerprint_key(fp)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from targets.session import (FINGERPRINT_KEY_FIELDS, OPT_LEVELS, ProviderUnavailableError, architecture, cpu_model,
                             fingerprint_key, machine_fingerprint, open_session, physical_cores, probe_providers,
                             resolve_threads, same_device)

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Target", "TargetError", "ProviderUnavailableError", "load_target", "list_targets", "fingerprint_key",
           "FINGERPRINT_KEY_FIELDS", "PRECISIONS", "KNOWN_PROVIDERS", "cpu_model", "physical_cores", "same_device"]

TARGETS_DIR = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "fp16", "int8")
KNOWN_PROVIDERS = (
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
    "MIGraphXExecutionProvider", "OpenVINOExecutionProvider", "DnnlExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "NnapiExecutionProvider", "QNNExecutionProvider", "XnnpackExecutionProvider",
    "ACLExecutionProvider", "ArmNNExecutionProvider", "WebGpuExecutionProvider", "AzureExecutionProvider",
    "VitisAIExecutionProvider", "CANNExecutionProvider", "RknpuExecutionProvider", "SNPEExecutionProvider",
)


class TargetError(ValueError):
    """A target that cannot be loaded; the message names the file and the field."""


@dataclass(frozen=True)
class Target:
    name: str
    providers: tuple[str, ...]
    batch_size: int = 1
    sequence_length: int = 128
    precisions: tuple[str, ...] = ("fp32",)
    intra_op_threads: int | str = "auto"
    graph_optimization_level: str = "all"
    optional_providers: tuple[str, ...] = ()
    architecture: str | None = None  # the device's CPU architecture (x86_64, aarch64, ...), where the TOML names it
    #: the TOML's ``[measurement]`` table as sorted ``(name, value)`` pairs (hashable); :attr:`measurement_settings`
    measurement: tuple = ()
    source: str = field(default="", compare=False)
    #: the fingerprint of the device this target stands for when that is not this machine (:meth:`on_device`)
    device: dict | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ views
    @property
    def measurement_settings(self) -> dict:
        """The ``[measurement]`` overrides of :data:`targets.meter.DEFAULT_MEASUREMENT` (empty: the defaults)."""
        return dict(self.measurement)

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    @property
    def threads(self) -> int:
        """Intra-op threads with ``"auto"`` resolved on this machine."""
        return resolve_threads(self.intra_op_threads)

    @property
    def uses_gpu(self) -> bool:
        return any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                         "DmlExecutionProvider") for p in self.providers)

    def check_precision(self, precision: str | None) -> str:
        """``precision`` or the default; a :class:`TargetError` if this target does not list it."""
        if precision is None:
            return self.default_precision
        if precision not in self.precisions:
            raise TargetError(
                f"target '{self.name}' ({self.source or 'built-in'}) does not support precision '{precision}'; "
                f"it lists: {', '.join(self.precisions)}"
            )
        return precision

    def settings(self) -> dict:
        """The raw settings (``"auto"`` unresolved): what a bundle carries to the device."""
        d = asdict(self)
        d.pop("source")
        d.pop("device")
        if d["architecture"] is None:
            d.pop("architecture")
        if self.measurement:  # read by targets.meter.measure_here
            d["measurement"] = self.measurement_settings
        else:
            d.pop("measurement")
        d["providers"] = list(self.providers)
        d["optional_providers"] = list(self.optional_providers)
        d["precisions"] = list(self.precisions)
        return d

    # ---------------------------------------------------------------- actions
    def session(self, onnx_path: str | os.PathLike):
        """An ``onnxruntime.InferenceSession`` with this target's providers, threads and optimization level.

        Raises :class:`ProviderUnavailableError` when this onnxruntime build lacks a required provider."""
        return open_session(onnx_path, self.providers, self.optional_providers, self.intra_op_threads,
                            self.graph_optimization_level)

    def check_available(self) -> list[str]:
        """The providers a session gets on this machine. Raises :class:`ProviderUnavailableError` (with what to
        install, or why it did not start) when a required provider is not in this onnxruntime build, or is a GPU
        provider that cannot start here (e.g. ``cuda`` on a machine without a GPU)."""
        return probe_providers(self.providers, self.optional_providers)

    def check_host(self) -> None:
        """Raise :class:`ProviderUnavailableError` unless this machine can *measure* the target: the same CPU
        architecture (where the target names one) and its execution providers available and starting here. The
        message points to the profiling bundle, which measures on the device itself."""
        here = architecture()
        name = self.name if not self.source or Path(self.source).parent == TARGETS_DIR else self.source
        bundle = (f"profile it on the device: nasprune-profile --target {name} --bundle DIR, "
                  "run DIR/run_profile.py there, and pass the table it writes with --latency-table")
        if self.architecture and architecture(self.architecture) != here:
            raise ProviderUnavailableError(f"target '{self.name}' is an {self.architecture} device and this machine "
                                           f"is {here}: {bundle}")
        try:
            self.check_available()
        except ProviderUnavailableError as e:
            raise ProviderUnavailableError(f"{e}. To measure target '{self.name}', {bundle}") from None

    def on_device(self, fingerprint: dict) -> "Target":
        """This target as the device ``fingerprint`` describes (a latency table measured there): its
        :meth:`fingerprint` is that device's, so what this machine measures for it is not measured on the target."""
        return replace(self, device=dict(fingerprint))

    @property
    def is_this_machine(self) -> bool:
        """Whether measuring here measures the target (no other device was named with :meth:`on_device`)."""
        return self.device is None

    def fingerprint(self, precision: str | None = None) -> dict:
        """The target's fingerprint at ``precision``: this machine's under the target's settings, or the device's
        (:meth:`on_device`)."""
        precision = self.check_precision(precision)
        if self.device is not None:
            return {**self.device, "precision": precision}
        return machine_fingerprint(self.providers, self.optional_providers, self.intra_op_threads, precision,
                                   self.batch_size, self.sequence_length, self.name)


# ---------------------------------------------------------------------- loading
_FIELDS = {
    "name": str, "providers": list, "optional_providers": list, "batch_size": int, "sequence_length": int,
    "precisions": list, "intra_op_threads": (int, str), "graph_optimization_level": str, "architecture": str,
    "measurement": dict,
}
#: the ``[measurement]`` table's fields (:data:`targets.meter.DEFAULT_MEASUREMENT`), their type and least value
_MEASUREMENT = {"warmup": (int, 0), "min_reps": (int, 1), "min_time_s": ((int, float), 0), "max_reps": (int, 1)}
_REQUIRED = ("name", "providers")


def list_targets() -> list[str]:
    """Names of the targets shipped with the package."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    s = str(name_or_path)
    p = Path(os.path.expanduser(s))
    looks_like_path = s.endswith(".toml") or os.sep in s or (os.altsep and os.altsep in s) or s.startswith(".")
    if looks_like_path:
        if not p.is_file():
            raise TargetError(f"target file not found: {p}")
        return p
    packaged = TARGETS_DIR / f"{s}.toml"
    if packaged.is_file():
        return packaged
    if p.is_file():
        return p
    raise TargetError(f"unknown target '{s}': not a file, and not one of the built-in targets ({', '.join(list_targets())})")


def load_target(name_or_path: str | os.PathLike) -> Target:
    """A built-in target by name (``cpu``, ``cuda``, ``arm64``) or a user's TOML file by path; every field checked."""
    if isinstance(name_or_path, Target):
        return name_or_path
    path = _resolve(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e})") from None
    return target_from_dict(data, str(path))


def target_from_dict(data: dict, source: str = "<dict>") -> Target:
    def err(field_name: str, msg: str) -> TargetError:
        return TargetError(f"{source}: field '{field_name}': {msg}")

    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise TargetError(f"{source}: unknown field(s) {', '.join(repr(u) for u in unknown)}; "
                          f"known fields: {', '.join(_FIELDS)}")
    for req in _REQUIRED:
        if req not in data:
            raise err(req, "missing (required)")
    for key, typ in _FIELDS.items():
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, typ):
                tname = "a table ([measurement])" if typ is dict else \
                    " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
                raise err(key, f"expected {tname}, got {type(v).__name__} ({v!r})")
    name = data["name"].strip()
    if not name:
        raise err("name", "must not be empty")
    providers = data["providers"]
    optional = data.get("optional_providers", [])
    for key, plist in (("providers", providers), ("optional_providers", optional)):
        for p in plist:
            if not isinstance(p, str):
                raise err(key, f"expected a list of strings, got {p!r}")
            if p not in KNOWN_PROVIDERS:
                raise err(key, f"unknown execution provider '{p}'; known: {', '.join(KNOWN_PROVIDERS)}")
    if not providers:
        raise err("providers", "must name at least one execution provider")
    for key in ("batch_size", "sequence_length"):
        if key in data and data[key] < 1:
            raise err(key, f"must be >= 1, got {data[key]}")
    precisions = data.get("precisions", ["fp32"])
    if not precisions:
        raise err("precisions", "must list at least one precision")
    for p in precisions:
        if p not in PRECISIONS:
            raise err("precisions", f"unknown precision {p!r}; known: {', '.join(PRECISIONS)}")
    threads = data.get("intra_op_threads", "auto")
    if isinstance(threads, str) and threads != "auto":
        raise err("intra_op_threads", f"expected an integer >= 1 or \"auto\", got {threads!r}")
    if isinstance(threads, int) and threads < 1:
        raise err("intra_op_threads", f"must be >= 1 (or \"auto\"), got {threads}")
    level = data.get("graph_optimization_level", "all")
    if level not in OPT_LEVELS:
        raise err("graph_optimization_level", f"expected one of {', '.join(OPT_LEVELS)}, got {level!r}")
    measurement = _measurement(data.get("measurement", {}), err)
    return Target(
        name=name, providers=tuple(providers), batch_size=data.get("batch_size", 1),
        sequence_length=data.get("sequence_length", 128), precisions=tuple(precisions), intra_op_threads=threads,
        graph_optimization_level=level, optional_providers=tuple(optional),
        architecture=architecture(data["architecture"]) if data.get("architecture") else None, source=source,
        measurement=measurement,
    )


def _measurement(table: dict, err) -> tuple:
    """The ``[measurement]`` table checked: known fields, numbers at least their least value, ``min_reps`` <=
    ``max_reps``; as sorted ``(name, value)`` pairs."""
    unknown = sorted(set(table) - set(_MEASUREMENT))
    if unknown:
        raise err("measurement", f"unknown field(s) {', '.join(repr(u) for u in unknown)}; "
                                 f"known: {', '.join(_MEASUREMENT)}")
    for key, (typ, least) in _MEASUREMENT.items():
        v = table.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, typ):
            raise err(f"measurement.{key}", f"expected a number, got {type(v).__name__} ({v!r})"
                      if isinstance(typ, tuple) else f"expected an integer, got {type(v).__name__} ({v!r})")
        if v < least:
            raise err(f"measurement.{key}", f"must be >= {least}, got {v}")
    from targets.meter import resolved_measurement

    merged = resolved_measurement({"measurement": table})
    if merged["min_reps"] > merged["max_reps"]:
        raise err("measurement", f"min_reps ({merged['min_reps']}) must not exceed max_reps ({merged['max_reps']})")
    return tuple(sorted(table.items()))
