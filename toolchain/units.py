"""Parsing budgets with units: ``20``, ``20ms``, ``0.02s``; ``512MB``, ``1.5GiB``; ``10M``, ``500K``; ``1pt``."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")

LATENCY_UNITS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 1e-3}  # -> milliseconds
MEMORY_UNITS = {"": 1.0, "b": 1e-6, "kb": 1e-3, "mb": 1.0, "gb": 1e3, "kib": 1024 / 1e6, "mib": 1024**2 / 1e6,
                "gib": 1024**3 / 1e6}  # -> megabytes (10^6 bytes)
PARAM_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}  # -> parameters
POINT_UNITS = {"": 1.0, "pt": 1.0, "pts": 1.0}  # -> points of a metric (x100: 1pt = 0.01 accuracy)


class BudgetError(ValueError):
    pass


def _parse(text: str | float, units: dict[str, float], what: str, default_unit: str) -> float:
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _NUMBER.match(str(text))
        if not m:
            raise BudgetError(f"cannot read {what} '{text}': expected a number with an optional unit "
                              f"({', '.join(u for u in units if u)}), e.g. 20{default_unit}")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit not in units:
            raise BudgetError(f"unknown unit '{m.group(2)}' in {what} '{text}'; use one of: "
                              f"{', '.join(u for u in units if u)}")
    if not value > 0 or value == float("inf"):
        raise BudgetError(f"{what} must be a positive number, got '{text}'")
    return value * units[unit]


def parse_latency(text) -> float:
    """Milliseconds from ``20``, ``20ms``, ``0.02s``, ``500us``."""
    return _parse(text, LATENCY_UNITS, "latency budget", "ms")


def parse_memory(text) -> float:
    """Megabytes (10^6 bytes) from ``512``, ``512MB``, ``0.5GB``, ``300MiB``, ``1GiB``, ``800KB``."""
    return _parse(text, MEMORY_UNITS, "memory budget", "MB")


def parse_params(text) -> float:
    """A parameter count from ``10000000``, ``10M``, ``500K``, ``0.1B``."""
    return _parse(text, PARAM_UNITS, "parameter budget", "M")


def parse_points(text) -> float:
    """Points of a metric (1pt = 0.01 accuracy, F1, ...) from ``1``, ``1pt``, ``0.5pt``."""
    return _parse(text, POINT_UNITS, "accuracy drop", "pt")
