"""What ``nasprune-profile`` (toolchain/cli.py) calls, and the cache policy: :func:`cache_root` (``$NASPRUNE_CACHE``
or ``~/.cache/nasprune``), :func:`tables_dir` (its ``tables/``), :func:`default_table_path` (a table's file there).

    run_profile(target="cpu", model=None, precision=None, out=None, bundle=None, unit_step=128,
                calibrate_samples=16, validate_samples=16, resume=True) -> Path
    run_profiles(["cpu", "arm64"], executor=None, ...) -> list[Path]

* ``bundle`` set: write a profiling bundle for a device without torch into that folder (nothing is measured
  here; weights are generated there from a seed) and return the folder; on the device ``python run_profile.py
  --out table.json`` measures the grid and the calibration and validation sub-networks, and nasprune fits the
  calibration and validation when it reads that table.
* otherwise: profile here, calibrate and validate on random MEDIUM sub-networks, write the table to ``out`` or to
  :func:`default_table_path` and return its path.
* several targets (:func:`run_profiles`): one after another here, or as Ray tasks, each on the node that is the
  target (docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from targets import Target, TargetError, fingerprint_key, load_target

log = logging.getLogger(__name__)

#: a Ray node that *is* target NAME advertises the custom resource ``target:NAME`` (``ray start --resources``)
RESOURCE_PREFIX = "target:"


def cache_root() -> Path:
    """nasprune's cache: ``$NASPRUNE_CACHE``, else ``~/.cache/nasprune`` (``tables/``, ``supernets/`` live there)."""
    root = os.environ.get("NASPRUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "nasprune"


def tables_dir() -> Path:
    """Where latency tables are cached: ``<cache_root()>/tables``."""
    return cache_root() / "tables"


def dims_key(dims) -> str:
    """A readable key of the widths a table depends on (layers do not matter: blocks are per layer)."""
    d = dims.to_dict() if hasattr(dims, "to_dict") else dict(dims)
    return f"{d['model_type']}-h{d['hidden_size']}-a{d['num_heads']}-i{d['intermediate_size']}-v{d['vocab_size']}"


def default_table_path(target: Target | str, precision: str | None, dims) -> Path:
    """Where the table of ``dims`` on ``target`` at ``precision`` (on this machine) is cached:
    ``<cache>/tables/<fingerprint_key>-<dims key>-<graph form>.json`` (the form of the graphs profiled,
    :func:`toolchain.onnx.build.graph_form`: a table of another form is not found, it is profiled anew)."""
    from toolchain.onnx.build import graph_form

    t = target if isinstance(target, Target) else load_target(target)
    fp = t.fingerprint(t.check_precision(precision))
    return tables_dir() / f"{fingerprint_key(fp)}-{dims_key(dims)}-{graph_form(t.uses_gpu)}.json"


def check_graph_form(table, target: Target) -> None:
    """Warn (:class:`~latency_models.lookup_table.FingerprintMismatchWarning`) when ``table`` was profiled on
    graphs of another form than the ones exported for ``target`` (:func:`toolchain.onnx.build.graph_form`; a
    table without the field was profiled before nasprune recorded it, on the fused form): its block costs hold for
    those graphs, not for the exported ones."""
    import warnings

    from latency_models.lookup_table import FingerprintMismatchWarning
    from toolchain.onnx.build import GPU_GRAPHS, graph_form

    profiled, exported = table.data.get("graph_form") or GPU_GRAPHS, graph_form(target.uses_gpu)
    if profiled != exported:
        warnings.warn(f"latency table {table.path or ''} was profiled on graphs of the {profiled!r} form, the "
                      f"exported models are of the {exported!r} form (toolchain.onnx.build): predictions may be "
                      "off -- re-profile with nasprune-profile", FingerprintMismatchWarning, stacklevel=2)


def find_table(target: Target | str, precision: str | None, dims):
    """The cached :class:`LatencyTable` for this target / precision / model on this machine, or ``None``."""
    from latency_models.lookup_table import LatencyTable

    p = default_table_path(target, precision, dims)
    return LatencyTable.load(p) if p.is_file() else None


def run_profile(target: str | Target, model: str | None = None, precision: str | None = None, out: str | None = None,
                bundle: str | None = None, unit_step: int = 128, calibrate_samples: int = 16,
                validate_samples: int = 16, resume: bool = True, progress: bool = True,
                model_config=None, measurement: dict | None = None, lengths: tuple[int, ...] | None = None) -> Path:
    """Profile ``model``'s blocks (default: all-MiniLM-L6-v2) on ``target`` (name or TOML path) at ``precision``
    (default: the target's first). Returns the table path, or the bundle folder when ``bundle`` is given.
    ``model_config`` (a transformers config) stands in for ``model`` where the model is not at hand;
    ``measurement`` overrides the timing settings (repetitions, minimum time; see :mod:`targets.meter`);
    ``lengths``: the sequence lengths covered besides the target's own (default: :func:`latency_models.profile.profile`'s;
    ``()``: the target's length only)."""
    from toolchain.core.modeling import ModelDims, load_config

    from latency_models.bundle import write_bundle
    from latency_models.profile import profile

    t = load_target(target)
    precision = t.check_precision(precision)
    config = model_config if model_config is not None else load_config(model)[1]
    dims = ModelDims.from_config(config)
    if bundle:
        return write_bundle(dims, t, precision, bundle, model_config=config, unit_step=unit_step,
                            measurement=measurement, progress=progress, calibrate_samples=calibrate_samples,
                            validate_samples=validate_samples)
    out_path = Path(out) if out else default_table_path(t, precision, dims)
    table = profile(dims, t, precision, out_path, model_config=config, unit_step=unit_step, progress=progress,
                    resume=resume, calibrate_samples=calibrate_samples,
                    validate_samples=validate_samples, measurement=measurement,
                    **({} if lengths is None else {"lengths": tuple(lengths)}))
    if progress:
        print(table.summary())
    return Path(table.path)


# ------------------------------------------------------------------------------------------- several targets
def target_resource(name: str) -> str:
    """The Ray custom resource a node offers when it is the device of target ``name``: ``target:<name>``."""
    return RESOURCE_PREFIX + name


@dataclass(frozen=True)
class ProfileJob:
    """One target's profile, as a value that a Ray task can run anywhere: the target and the model config travel
    with it (no file of the driver is read where it runs). ``cache``: the tables folder to use there (the
    driver's, on a one-machine Ray instance; ``None``: that machine's own cache)."""

    target: Target
    precision: str
    model_config: object
    unit_step: int = 128
    calibrate_samples: int = 16
    validate_samples: int = 16
    resume: bool = True
    progress: bool = False
    cache: str | None = None
    measurement: dict | None = None

    def __call__(self) -> tuple[str, dict]:
        """Profile where this runs; returns (the table's file name on that machine, the table's JSON)."""
        import json

        from toolchain.core.modeling import ModelDims

        dims = ModelDims.from_config(self.model_config)
        path = default_table_path(self.target, self.precision, dims)  # fingerprint of the machine that measures
        if self.cache:
            path = Path(self.cache) / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        run_profile(self.target, precision=self.precision, out=str(path), unit_step=self.unit_step,
                    calibrate_samples=self.calibrate_samples, validate_samples=self.validate_samples,
                    resume=self.resume, progress=self.progress, model_config=self.model_config,
                    measurement=self.measurement)
        return path.name, json.loads(path.read_text())


def _run_job(job: ProfileJob):
    return job()


def run_profiles(targets, executor=None, *, model: str | None = None, precision: str | None = None,
                 out_dir: str | None = None, unit_step: int = 128, calibrate_samples: int = 16,
                 validate_samples: int = 16, resume: bool = True, progress: bool = True,
                 measurement: dict | None = None) -> list[Path]:
    """Profile several ``targets`` (names, TOML paths or :class:`Target`); returns one table path per target.

    Without an executor (or a local one), the targets are profiled one after another in this process. With a
    :class:`toolchain.search.executors.RayExecutor` each profile is a Ray task: a target whose device is a node offering
    the custom resource ``target:<name>`` (see :func:`target_resource`) runs there, at the same time as the
    profiles of other devices; every other target runs on this machine's node, one after another and never beside
    another profile of this machine, because profiles sharing cores would distort each other's timings. The
    tables are written to ``out_dir`` (file names as in the cache), or to this machine's cache.
    """
    from toolchain.core.modeling import load_config

    from latency_models.lookup_table import LatencyTable

    loaded = [load_target(t) for t in targets]
    if not loaded:
        raise TargetError("no target to profile")
    names = [t.name for t in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TargetError(f"target(s) named twice: {', '.join(twice)}")
    precisions = [t.check_precision(precision) for t in loaded]
    _, config = load_config(model)
    remote = executor is not None and getattr(executor, "name", "local") != "local"
    on_one_machine = not remote or getattr(executor, "local", True)
    cache = str(tables_dir()) if on_one_machine else None
    jobs = [ProfileJob(t, p, config, unit_step, calibrate_samples, validate_samples, resume,
                       progress and not remote, cache, measurement) for t, p in zip(loaded, precisions)]
    if not remote:
        for t in loaded:
            t.check_host()  # before the first (long) profile, not after it
        results = [job() for job in jobs]
    else:
        offered = executor.resources()
        resources = [{target_resource(t.name): 1} if target_resource(t.name) in offered else None for t in loaded]
        exclusive = [r is None for r in resources]
        for t, r in zip(loaded, resources):
            if r is None:
                t.check_host()
                log.info("target %s: no Ray node offers resource '%s'; profiled on this machine, one target at a "
                         "time", t.name, target_resource(t.name))
            else:
                log.info("target %s: profiled on the Ray node that offers '%s'", t.name, target_resource(t.name))
        results = executor.run(_run_job, jobs, resources, exclusive)
    paths = []
    for (name, data), job in zip(results, jobs):
        dest = (Path(out_dir) if out_dir else tables_dir()) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if job.cache is None or dest != Path(job.cache) / name:  # measured elsewhere, or asked for elsewhere
            LatencyTable(data, dest).save(dest)
        paths.append(dest)
    return paths
