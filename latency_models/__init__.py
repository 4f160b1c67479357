"""Latency and memory models of sub-networks on a target: profiling, lookup tables, predictors, validation.

Profiling: ``from latency_models.profile import profile`` (needs torch); tables: ``LatencyTable.load(path)``.
"""

from latency_models.lookup_table import FingerprintMismatchWarning, LatencyTable, TableError, error_stats

__all__ = ["LatencyTable", "TableError", "FingerprintMismatchWarning", "error_stats", "calibrate",
           "validate", "write_bundle", "run_profile", "default_table_path"]


def __getattr__(name):  # the profiler needs torch; import it lazily
    if name in ("calibrate", "validate", "write_bundle", "measure_subnet"):
        from latency_models import profile as _p

        return getattr(_p, name)
    if name in ("run_profile", "default_table_path"):
        from latency_models import cli_api

        return getattr(cli_api, name)
    raise AttributeError(name)
