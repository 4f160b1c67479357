"""A latency table's calibration: end-to-end measurements as a function of the table's raw sum of blocks.

:func:`fit` fits ``measured ~ c * raw^2 + a * raw + b`` robustly (scipy's ``least_squares`` on relative residuals,
soft-L1 loss); :func:`calibrated` applies it. A calibration must be *sound*: rising with the raw sum, and positive from
the smallest calibration sample up. A fit on few or noisy samples need not be (a tiny test model's table, on 3
samples of a few tenths of a millisecond, fitted a line falling with the raw sum, and another one that predicted a
negative latency for a small network): such a fit falls back to the pure scale ``a * raw``. Below the smallest
calibration sample (``raw_min``) a prediction is no lower than that sample's, scaled in proportion to the raw sum, so
that a line with a negative offset does not reach zero.
"""

from __future__ import annotations

import numpy as np

LINE = "a * raw + b"
QUADRATIC = "c * raw^2 + a * raw + b"
SCALE = "a * raw (a fitted offset was unsound: falling, or not positive over the samples)"


def robust_polyfit(x: np.ndarray, y: np.ndarray, degree: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Coefficients (highest power first) of ``y ~ poly(x)``, on relative residuals (times ``sqrt(weights)``)."""
    from scipy.optimize import least_squares

    root = np.sqrt(np.ones_like(x) if weights is None else weights)
    scale = np.maximum(np.abs(y), 1e-9)
    p0 = np.polyfit(x, y, degree, w=root)
    return least_squares(lambda p: root * (np.polyval(p, x) - y) / scale, p0, loss="soft_l1", f_scale=0.02).x


def sound(c: float, a: float, b: float, lo: float, hi: float) -> bool:
    """Whether ``c * raw^2 + a * raw + b`` rises over ``[0, hi]`` and is positive at ``lo``."""
    return min(a, a + 2 * c * hi) > 0 and c * lo * lo + a * lo + b > 0


def _scale(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The weighted least-squares ``a`` of ``y ~ a * x``."""
    return float(np.sum(w * x * y) / np.sum(w * x * x))


def fit(raw, measured, degree: int = 1, weights=None) -> dict:
    """Fit ``measured ~ a * raw + b`` (a pure scale for < 3 samples, or where the line is not :func:`sound`;
    ``weights``: how many samples each one counts as); ``degree=2`` adds ``c * raw**2`` (with >= 6 samples, where
    the curve is sound). Returns ``{"a", "b", "c", "n", "method", "samples", "raw_min"}``."""
    x, y = np.asarray(raw, float), np.asarray(measured, float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    c, form = 0.0, LINE
    if len(x) >= 3 and np.ptp(x) > 0:
        a, b = robust_polyfit(x, y, 1, w)
        if not sound(0.0, a, b, x.min(), x.max()):
            a, b, form = _scale(x, y, w), 0.0, SCALE
        if degree == 2 and len(x) >= 6:
            c2, a2, b2 = robust_polyfit(x, y, 2, w)
            if sound(c2, a2, b2, x.min(), x.max()):
                c, a, b, form = c2, a2, b2, QUADRATIC
    elif len(x):
        a, b = _scale(x, y, w), 0.0
    else:
        a, b = 1.0, 0.0
    samples = [{"raw": float(r), "measured": float(m), **({"weight": float(v)} if v != 1 else {})}
               for r, m, v in zip(x, y, w)]
    return {"a": float(a), "b": float(b), "c": float(c), "n": int(len(x)),
            "method": "robust (soft-L1 on relative residuals, scipy least_squares) measured = " + form,
            "samples": samples, **({"raw_min": float(x.min())} if len(x) else {})}


def calibrated(cal: dict, raw: float) -> float:
    """``raw`` through the calibration ``cal`` (:func:`fit`'s; identity without one). Below ``raw_min`` (tables
    fitted since it is stored), at least the smallest sample's calibrated value in proportion to ``raw``."""
    a, b, c = cal.get("a", 1.0), cal.get("b", 0.0), cal.get("c", 0.0)
    value = c * raw * raw + a * raw + b
    lo = cal.get("raw_min")
    if lo and 0 <= raw < lo:
        value = max(value, (c * lo * lo + a * lo + b) * raw / lo)
    return float(value)
