"""Latency and memory models of sub-networks on a target: profiling, lookup tables, predictors, validation.

Modules: ``lookup_table`` (the table and its predictors), ``grid`` (the micro-graphs and the measuring worker),
``calibration`` (end-to-end calibration and validation), ``profile`` (``profile()``: grid + calibration -> table),
``bundle`` (profiling bundles for devices without torch), ``bundle_runner`` (the standalone grid runner),
``cache`` (where tables are cached, ``run_profile``). Measuring itself is :mod:`targets.meter`.

Profiling needs torch: ``from latency_models.profile import profile``; tables: ``LatencyTable.load(path)``.
"""

from latency_models.lookup_table import FingerprintMismatchWarning, LatencyTable, TableError, error_stats

__all__ = ["LatencyTable", "TableError", "FingerprintMismatchWarning", "error_stats", "calibrate",
           "validate", "measure_subnet", "write_bundle", "run_profile", "default_table_path"]

_LAZY = {"calibrate": "calibration", "validate": "calibration", "measure_subnet": "calibration",
         "write_bundle": "bundle", "run_profile": "cache", "default_table_path": "cache"}


def __getattr__(name):  # the profiler needs torch; import it lazily
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"latency_models.{_LAZY[name]}"), name)
    raise AttributeError(name)
