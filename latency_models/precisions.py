"""Latency tables of one model on one target at several precisions, read as one (:class:`FastestPrecision`).

On a target that lists several precisions (CPU: fp32 and int8), a compile exports each chosen sub-network in each
of them and ships the Pareto set across precisions by measurement (toolchain.pipeline.export_stage). The search
should therefore place a sub-network where it will run fastest: with one table per precision, its latency is the
lowest of their predictions, its memory that precision's. Under ``--max-latency 3ms`` a sub-network at 5 ms in fp32
and 2.4 ms in int8 is then a candidate, not a violator.
"""

from __future__ import annotations

from latency_models.lookup_table import LatencyTable


class FastestPrecision:
    """The search's view of one or several :class:`LatencyTable` s (``{precision: table}``, the default precision
    first): :meth:`predict_latency` is the lowest prediction, :meth:`predict_memory` and the precision
    (:meth:`precision_of`) are those of the fastest; :meth:`latency_bound` is the widest of the tables' bounds,
    so a confidence holds whichever precision a sub-network ends up in. With one table, each reads as that table."""

    def __init__(self, tables: dict[str, LatencyTable]):
        if not tables:
            raise ValueError("FastestPrecision needs at least one latency table")
        self.tables = dict(tables)

    @property
    def precisions(self) -> list[str]:
        return list(self.tables)

    def _predictions(self, subnet, quantile: float | None = None) -> dict[str, float]:
        return {p: t.predict_latency(subnet, quantile) for p, t in self.tables.items()}

    def precision_of(self, subnet, quantile: float | None = None) -> str:
        """The precision ``subnet`` is predicted to run fastest in (the default one on a tie)."""
        pred = self._predictions(subnet, quantile)
        return min(pred, key=pred.__getitem__)

    def predict_latency(self, subnet, quantile: float | None = None) -> float:
        return min(self._predictions(subnet, quantile).values())

    def predict_memory(self, subnet) -> float:
        return self.tables[self.precision_of(subnet)].predict_memory(subnet)

    def latency_bound(self, quantile: float) -> dict:
        """The widest of the tables' :meth:`LatencyTable.latency_bound` (its ``precision`` named), with every
        table's factor under ``by_precision``; with one table, its bound."""
        if len(self.tables) == 1:
            return next(iter(self.tables.values())).latency_bound(quantile)
        bounds = {p: t.latency_bound(quantile) for p, t in self.tables.items()}
        widest = max(bounds, key=lambda p: bounds[p]["factor"])
        return {**bounds[widest], "precision": widest, "by_precision": {p: b["factor"] for p, b in bounds.items()}}

    def describe(self) -> str:
        """What ``settings["search_latency"]`` records: the precision, or ``the fastest of fp32, int8``."""
        return "the fastest of " + ", ".join(self.tables) if len(self.tables) > 1 else self.precisions[0]

    def paths(self) -> dict[str, str]:
        return {p: str(t.path) for p, t in self.tables.items()}
