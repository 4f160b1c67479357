"""Stage 1 of a compile: the target's latency tables. :func:`latency_table_for` gives the table of the run's
precision (the user's ``--latency-table``, the cached one, or a new profile); :func:`search_table_for` gives what the
search places candidates with: that table alone, or, where every precision of the target is tried
(:func:`other_precisions`), :class:`~latency_models.precisions.FastestPrecision` over one table per precision. A
table of another precision than the run's is profiled at the target's length only, with
:data:`SIDE_SAMPLE_SHARE` of the run's end-to-end samples (the preset's, or ``--calibrate-samples`` /
``--validate-samples``; a full one, from ``nasprune-profile``, is used where cached)."""

from __future__ import annotations

import logging
from pathlib import Path

from latency_models.cache import check_graph_form, default_table_path, run_profile
from latency_models.grid import table_lengths
from latency_models.lookup_table import LatencyTable, TableError
from latency_models.precisions import FastestPrecision
from targets import Target, load_target
from targets.meter import STEADY_SHARE
from toolchain.options import CompileError, CompileOptions
from toolchain.run import Run

log = logging.getLogger(__name__)

#: the share of the run's calibration and validation samples that a table of another precision is profiled with
#: (at the target's length only): measured here, an int8 table of the default model with 10 + 10 samples took 145 s
#: (grid 20 s), too much for the 20-minute compile; 8 + 4 took 107 s in a default compile (bench_compile, 0281bab)
SIDE_SAMPLE_SHARE = (0.8, 0.4)
#: fewer readings than this say too little about the machine to warn
STEADY_MIN_READINGS = 8


def _cached_table(path: Path) -> LatencyTable:
    log.info("using cached latency table %s", path)
    try:
        return LatencyTable.load(path)
    except TableError as e:
        raise TableError(f"the cached latency table cannot be used: {e}. Delete {path} and run the same command "
                         "again to profile the target anew") from None


def _samples_unused(opts: CompileOptions, table: LatencyTable, what: str) -> None:
    """Warn that ``--calibrate-samples`` / ``--validate-samples``, where given, do not apply to a table that is not
    profiled now, and say what that table rests on."""
    given = [flag for flag, v in (("--calibrate-samples", opts.calibration_samples),
                                  ("--validate-samples", opts.validation_samples)) if v is not None]
    if given:
        n_cal = (table.calibration.get("latency") or {}).get("n", 0)
        n_val = (table.validation.get("latency") or {}).get("n", 0)
        log.warning("%s: only for a latency table this compile profiles; %s is used as it is: calibrated on %d "
                    "end-to-end measurements (the unpruned network's included), validated on %d",
                    " and ".join(given), what, n_cal, n_val)


def warn_if_unsteady(table: LatencyTable) -> bool:
    """Warn (and return True) when the unpruned network, measured beside ``table``'s calibration and validation
    samples, repeated within ±5 % of its median less than :data:`~targets.meter.STEADY_SHARE` of the time
    (:meth:`LatencyTable.steadiness`): a busy machine, whose readings no prediction can be checked against to ±5 %."""
    steady = table.steadiness()
    if steady["share"] is None or steady["n"] < STEADY_MIN_READINGS or steady["share"] >= STEADY_SHARE:
        return False
    log.warning("latency table %s: the unpruned network, measured beside its %d calibration and validation samples, "
                "repeated within ±5 %% of its median only %.0f %% of the time: the machine was busy, so the table's "
                "validation error and the latencies measured on it are uncertain beyond ±5 %%. Profile again on a "
                "quiet machine (nasprune-profile) for a table you can check to ±5 %%",
                table.path or "", steady["n"], 100 * steady["share"])
    return True


def latency_table_for(opts: CompileOptions, target: Target, precision: str, dims, model_config, *,
                      side: bool = False) -> LatencyTable:
    """The target's latency table at the target's sequence length: the user's file, the cached one, or a new
    profile. A table covers several lengths (:meth:`LatencyTable.at_length`), so a ``--sequence-length`` between
    them is read off the target's own table (its TOML length), profiled once for all of them; a length beyond
    them gets a table of its own. ``side``: a table of another precision than the run's, for the search only
    (:func:`search_table_for`): a new profile covers the target's length alone, with :data:`SIDE_SAMPLE_SHARE` of
    the samples."""
    n = target.sequence_length
    if opts.latency_table:
        path = Path(opts.latency_table)
        if not path.is_file():
            raise CompileError(f"latency table not found: {path}")
        table = LatencyTable.load(path)
        _samples_unused(opts, table, "the --latency-table file")
    else:
        own = load_target(opts.target)  # the target at its own length: the table every length is read off
        table = None
        for t in (target, own) if own.sequence_length != n else (target,):
            path = default_table_path(t, precision, dims)
            if path.is_file():
                table = _cached_table(path)
                if table.covers(n):
                    _samples_unused(opts, table, f"the cached table {path} (delete it to profile anew)")
                    break
                table = None  # a table of one length (profiled before tables covered several)
        if table is None:
            lengths = table_lengths(own, model_config)
            t = own if lengths[0] <= n <= lengths[-1] and not side else target
            path = default_table_path(t, precision, dims)
            share = SIDE_SAMPLE_SHARE if side else (1.0, 1.0)
            log.info("profiling %s (%s) for this model family%s; cached in %s", t.name, precision,
                     f" at {n} tokens, to place sub-networks in {precision} during the search" if side else "", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = LatencyTable.load(run_profile(
                target=t, model=opts.model, precision=precision, out=str(path), bundle=None,
                unit_step=opts.budget("unit_step"),
                calibrate_samples=round(share[0] * opts.budget("calibration_samples")),
                validate_samples=round(share[1] * opts.budget("validation_samples")), resume=True,
                progress=opts.progress, lengths=() if side else None))
    warn_if_unsteady(table)
    table = table.at_length(n) if table.covers(n) else table
    table.check_model(dims)
    check_graph_form(table, target)
    if table.measured_on(target, precision):
        table.check_fingerprint(target, precision)  # warns on another runtime or setting
    return table


def other_precisions(opts: CompileOptions, target: Target, precision: str) -> list[str]:
    """The target's precisions besides ``precision`` that a compile tries too: all of them unless ``--precision``
    chose one, or the table is of another device (only its own precision has a prediction there)."""
    if opts.precision or not target.is_this_machine:
        return []
    return [p for p in target.precisions if p != precision]


def search_table_for(opts: CompileOptions, target: Target, precision: str, table: LatencyTable, dims,
                     model_config) -> FastestPrecision:
    """What the search places candidates with: :class:`FastestPrecision` over ``table`` (of ``precision``) and, where
    the compile tries :func:`other_precisions` too, one table per other precision (not with ``--latency-table``: the
    user's table is the one to place them with; the others are judged by what they measure)."""
    others = [] if opts.latency_table else other_precisions(opts, target, precision)
    return FastestPrecision({precision: table, **{
        p: latency_table_for(opts, target, p, dims, model_config, side=True) for p in others}})


def table_for_run(run: Run, opts: CompileOptions) -> tuple[Target, str, LatencyTable, FastestPrecision]:
    """``(target, precision, table, search table)`` for the super-network of a run folder (a table to profile is of
    its family; the search table: :func:`search_table_for`)."""
    target = opts.resolved_target()  # at the length asked for, else the one the run was compiled at
    precision = target.check_precision(opts.precision)
    dims, config = run.supernet.dims, run.supernet.config
    table = latency_table_for(opts, target, precision, dims, config)
    target = table.device_target(target, precision)
    return target, precision, table, search_table_for(opts, target, precision, table, dims, config)


