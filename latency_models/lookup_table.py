"""The latency table: per-block latency and memory of one model family on one target, and the predictors.

The JSON file (format ``nasprune.latency_table``, see docs/profiling.md) holds the target's fingerprint, the
measured base (zero-layer model) and per-block costs on a (heads x units) grid, how they were measured, a
calibration fitted on end-to-end measurements, and the validation error on held-out sub-networks.

Predictions::

    raw_latency(subnet) = base + sum_l L(h_l, u_l)                                       [ms]
    raw_memory(subnet)  = base + sum_l W(h_l, u_l) + max_l K(h_l, u_l)                   [MB = 10^6 bytes]
    latency(subnet) = c_lat * raw_latency^2 + a_lat * raw_latency + b_lat
    memory(subnet)  = a_mem * raw_memory + b_mem

with L / W / K the block latency / weight / working-memory grids, linearly interpolated over units (and heads
where the head grid is not complete; scipy's ``RegularGridInterpolator``); a dropped layer (0 heads, 0 units) costs
nothing. Weights add up over layers; ONNX Runtime's arena reuses activation buffers between layers, so working
memory is the largest layer's. The latency calibration is quadratic (``c_lat`` > 0) only where the fitted curve
rises over the whole measured range, else a straight line (``c_lat`` = 0), else a pure scale: see
:mod:`latency_models.fit`.
``predict_latency(subnet, quantile)`` is an upper bound instead: the prediction times the conformal quantile of
``measured / predicted`` over the validation residuals (:meth:`LatencyTable.latency_bound`).
Memory is what :func:`targets.meter.measure` measures: peak RSS while serving minus RSS before the session.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from latency_models.assemble import table_problem
from latency_models.fit import calibrated, fit
from latency_models.lengths import SMOOTH_METHOD, blocks_at, smooth_grid
from latency_models.bundle_runner import write_json
from targets.meter import (STEADY_SHARE, drift_corrected, paired_drift_corrected, paired_ratio, quiet_latency,
                          repeatability)
from toolchain.core.subnetwork import SubNetwork
from targets.session import same_device

log = logging.getLogger(__name__)

FINGERPRINT_CHECKED = ("cpu_model", "physical_cores", "threads", "onnxruntime", "provider", "gpu", "precision",
                       "batch_size", "sequence_length")


#: the per-block grids of a table (``blocks.<name>``): latency L(h, u), weights W(h, u), working memory K(h, u)
BLOCKS = ("latency_ms", "weights_mb", "working_mb")


class TableError(ValueError):
    """A latency table file that cannot be used; the message names the file and what is wrong."""


class FingerprintMismatchWarning(UserWarning):
    """The table was measured on another machine / runtime / setting than the one asked for."""


class LatencyTable:
    _parent: "LatencyTable | None" = None  # set on a view at another sequence length (:meth:`at_length`)

    def __init__(self, data: dict, path: str | Path | None = None):
        self.data = data
        self.path = Path(path) if path is not None else None
        problem = table_problem(data)
        if problem:
            raise TableError(f"{path or '<table>'}: {problem}; re-run nasprune-profile to regenerate it")
        self.heads_grid = [int(h) for h in data["grid"]["heads"]]
        self.units_grid = [int(u) for u in data["grid"]["units"]]
        blocks = data["blocks"]
        if "fit" not in blocks and not (data.get("calibration", {}).get("latency") or {}).get("n") and \
                "measured_latency_ms" in blocks:  # a new table (a profile's, a device's): smoothed before any fit
            blocks["latency_ms"], blocks["fit"] = smooth_grid(blocks["latency_ms"], self.heads_grid,
                                                              self.units_grid), SMOOTH_METHOD
        self._interp = self._interpolators(np.stack([np.asarray(blocks[k], dtype=float) for k in BLOCKS], -1))
        lengths = data.get("lengths")
        if lengths and lengths.get("cross") and "at" not in lengths:  # as measured (a device's, or a new profile's)
            lengths["at"] = blocks_at(data)
        self.fit_end_to_end()  # a device's table (profiling bundle): calibrated and validated as it is read

    # --------------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise TableError(f"latency table not found: {path}") from None
        except OSError as e:
            raise TableError(f"{path}: cannot read ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TableError(f"{path}: not valid JSON ({e}); re-run nasprune-profile to regenerate it") from None
        return cls(data, path)

    def save(self, path: str | Path | None = None) -> Path:
        if self._parent is not None:  # a view at another length: the table it belongs to is the file
            return self._parent.save(path)
        path = Path(path or self.path)
        write_json(path, self.data)
        self.path = path
        return path

    # ------------------------------------------------------------------ views
    @property
    def fingerprint(self) -> dict:
        return self.data["fingerprint"]

    @property
    def precision(self) -> str:
        return self.fingerprint["precision"]

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def calibration(self) -> dict:
        return self.data.setdefault("calibration", {})

    @property
    def validation(self) -> dict:
        return self.data.setdefault("validation", {})

    def fingerprint_differences(self, fingerprint: dict) -> dict:
        """``{field: (table's value, given value)}`` for the fields that decide whether the table applies."""
        mine = self.fingerprint
        return {k: (mine.get(k), fingerprint.get(k)) for k in FINGERPRINT_CHECKED if mine.get(k) != fingerprint.get(k)}

    def measured_on(self, target, precision: str | None = None) -> bool:
        """Whether this table was measured on the device ``target`` is (here: this machine), by
        :func:`targets.same_device` (another runtime version or thread count is the same device)."""
        return same_device(self.fingerprint, target.fingerprint(precision))

    def device_target(self, target, precision: str | None = None):
        """``target``, or -- this table measured on another device -- the target as that device
        (:meth:`targets.Target.on_device`): what is measured here is then not measured on the target, and the export
        ships by this table's predictions (:func:`toolchain.ship.selection.constraint_violation`)."""
        if self.measured_on(target, precision):
            return target
        fp = self.fingerprint
        log.warning("the latency table %s was measured on another device (%s, %s): points are verified and measured "
                    "here but shipped by its predictions and marked not measured on the target; measure them on the "
                    "device (profiling bundle: run_profile.py --measure-points) and give the result to "
                    "`nasprune export RUN --measured`", self.path, fp.get("cpu_model"), fp.get("gpu") or
                    fp.get("provider"))
        return target.on_device(fp)

    def check_fingerprint(self, target, precision: str | None = None) -> dict:
        """Warn (:class:`FingerprintMismatchWarning`) when this table was measured under other conditions than
        ``target`` at ``precision`` on this machine; returns the differences."""
        fp = target.fingerprint(precision)
        diff = self.fingerprint_differences(fp)
        if diff:
            lines = ", ".join(f"{k}: table {a!r} vs now {b!r}" for k, b_a in diff.items() for a, b in [b_a])
            warnings.warn(f"latency table {self.path or ''} was measured under different conditions ({lines}); "
                          "predictions may be off -- re-profile with nasprune-profile", FingerprintMismatchWarning, 2)
        return diff

    def check_model(self, dims) -> None:
        d = dims.to_dict() if hasattr(dims, "to_dict") else dict(dims)
        m = self.model
        for k in ("hidden_size", "num_heads", "head_size", "intermediate_size"):
            if k in m and m[k] != d.get(k):
                raise TableError(f"latency table {self.path or ''} is for a model with {k}={m[k]}, not {d.get(k)}")

    # ------------------------------------------------------------ predictors
    def _interpolators(self, grids: np.ndarray) -> tuple:
        """Linear interpolators over (heads, units) of the stacked block grids (``grids[h, u, k]``, ``k`` in
        :data:`BLOCKS`): one for layers that keep FFN units, one for layers that keep heads only. Cell (0, 0) is a
        dropped layer (cost 0), not a block: next to it, each uses the nearest real block instead, (0, units[1])
        along the units and (heads[1], 0) along the heads."""
        along_units, along_heads = grids.copy(), grids.copy()
        if self.heads_grid[0] == 0 and self.units_grid[0] == 0:
            along_units[0, 0] = grids[0, min(1, grids.shape[1] - 1)]
            along_heads[0, 0] = grids[min(1, grids.shape[0] - 1), 0]
        axes = (np.asarray(self.heads_grid, dtype=float), np.asarray(self.units_grid, dtype=float))
        return tuple(RegularGridInterpolator(axes, g, method="linear") for g in (along_units, along_heads))

    def _blocks(self, heads, units) -> np.ndarray:
        """Block costs of layers with ``heads`` / ``units``: one row per layer, columns as :data:`BLOCKS` (latency,
        weights, working memory). Values outside the grid are clamped to its edge; a dropped layer costs 0."""
        h, u = np.asarray(heads, dtype=float).ravel(), np.asarray(units, dtype=float).ravel()
        if not len(h):
            return np.zeros((0, len(BLOCKS)))
        pts = np.column_stack([np.clip(h, self.heads_grid[0], self.heads_grid[-1]),
                               np.clip(u, self.units_grid[0], self.units_grid[-1])])
        along_units, along_heads = self._interp
        out = along_units(pts)
        # they differ only for layers without units below the second head count (none with a complete head grid)
        second = self.heads_grid[1] if len(self.heads_grid) > 1 else np.inf
        near = (u == 0) & (h > 0) & (pts[:, 0] < second)
        if near.any():
            out[near] = along_heads(pts[near])
        out[(h == 0) & (u == 0)] = 0.0
        return out

    def layer_latency(self, heads: int, units: int) -> float:
        return float(self._blocks([heads], [units])[0, 0])

    def raw_latency(self, subnet) -> float:
        """Uncalibrated latency (ms): base + sum of block costs."""
        return float(self.data["base"]["latency_ms"] + self._blocks(subnet.heads, subnet.units)[:, 0].sum())

    def raw_memory(self, subnet) -> float:
        """Uncalibrated memory (MB): base + weights of every kept layer + the largest layer's working memory."""
        blocks = self._blocks(subnet.heads, subnet.units)
        kept = (np.asarray(subnet.heads) > 0) | (np.asarray(subnet.units) > 0)
        largest = blocks[kept, 2].max() if kept.any() else 0.0
        return float(self.data["base"]["memory_mb"] + blocks[:, 1].sum() + max(largest, 0.0))

    def weights_mb(self, subnet) -> float:
        """Weight bytes (MB) of the sliced model at this table's precision."""
        return float(self.data["base"].get("weights_mb", 0.0) + self._blocks(subnet.heads, subnet.units)[:, 1].sum())

    def _calibrated(self, kind: str, raw: float) -> float:
        return calibrated(self.calibration.get(kind) or {}, raw)

    def predict_latency(self, subnet, quantile: float | None = None) -> float:
        """Predicted end-to-end latency (ms) of the sliced, exported ``subnet`` on this table's target. With
        ``quantile`` (e.g. 0.95): an upper bound that a measurement stays under with that probability, the prediction
        times :meth:`latency_bound`'s factor (the point prediction where the table has no validation residuals)."""
        point = self._calibrated("latency", self.raw_latency(subnet))
        return point if quantile is None else point * self.latency_bound(quantile)["factor"]

    def latency_residuals(self) -> tuple[list[float], str]:
        """The validation's relative errors ``measured / predicted - 1``, one per held-out sub-network, and how they
        were taken (:func:`residuals_of`): stored by :func:`latency_models.calibration.validate`, else (a table
        written before they were stored) derived from its validation samples; ``([], ...)`` without samples."""
        v = self.validation.get("latency") or {}
        if "residuals" in v:
            return [float(r) for r in v["residuals"]], v.get("residuals_method", RESIDUALS_DRIFT_CORRECTED)
        samples = v.get("samples") or []
        return residuals_of(samples, (self.calibration.get("latency") or {}).get("reference_ms")) if samples else \
            ([], "the table has no latency validation samples")

    def latency_bound(self, quantile: float) -> dict:
        """How :meth:`predict_latency` bounds latency at ``quantile``: ``factor``, the upper empirical quantile of
        ``measured / predicted`` over the validation residuals at level ``ceil((n + 1) * quantile) / n`` (split
        conformal prediction; the largest ratio where ``n`` is too small for that level, said in ``note``), with
        ``n``, ``level`` and ``residuals`` (how they were taken). Without residuals the factor is 1 (the point
        prediction) and a warning says so, once per table."""
        if not 0 < quantile < 1:
            raise ValueError(f"a latency confidence is between 0 and 1 (e.g. 0.95), got {quantile}")
        res, method = self.latency_residuals()
        info = {"quantile": float(quantile), "n": len(res), "residuals": method}
        if not res:
            info.update(factor=1.0, note="no validation residuals: the bound is the point prediction")
            if not self.__dict__.get("_said_no_residuals"):
                self._said_no_residuals = True
                log.warning("latency table %s has no validation residuals (%s): the %g latency bound is the "
                            "point prediction; re-profile with validation samples for a bound", self.path or "",
                            method, quantile)
        else:
            n = len(res)
            need = math.ceil((n + 1) * quantile - 1e-9)  # rank of the conformal quantile among the n ratios
            k = min(need, n)
            # the k-th smallest ratio: inverted CDF, half a step below k / n so that rounding cannot move it
            info.update(level=k / n, factor=float(np.quantile(1.0 + np.asarray(res), (k - 0.5) / n,
                                                              method="inverted_cdf")))
            if need > n:
                info["note"] = (f"{n} validation residuals are too few for a {quantile:g} bound with a guarantee "
                                f"(it needs {math.ceil(quantile / (1 - quantile) - 1e-9)}): the largest ratio is used")
        return info

    def predict_memory(self, subnet) -> float:
        """Predicted memory (MB = 10^6 bytes) of the sliced, exported ``subnet``: what :func:`targets.meter.measure`
        measures, the peak resident size while it serves minus the resident size before its session existed."""
        return self._calibrated("memory", self.raw_memory(subnet))

    def set_calibration(self, kind: str, raw: list[float], measured: list[float], degree: int = 1,
                        weights: list[float] | None = None) -> dict:
        """Fit ``measured ~ a * raw + b`` (``degree=2``: ``+ c * raw**2``; ``weights``: how many samples each one
        counts as) robustly, a pure scale where the fit is unsound (:func:`latency_models.fit.fit`): one sample taken
        on a busy machine (+60 % in one bench_latency run) does not tilt a fit on 9 samples."""
        cal = fit(raw, measured, degree, weights)
        self.calibration[kind] = cal
        return cal

    # ------------------------------------------------- calibration and validation from end-to-end measurements
    def _unpruned(self):
        m = self.model
        return SubNetwork.full(m["num_layers"], m["num_heads"], m["intermediate_size"])

    def calibrate_from(self, rows) -> dict:
        """Fit ``measured = c * raw^2 + a * raw + b`` (latency; memory: ``a * raw + b``, :meth:`set_calibration`) on
        end-to-end ``rows``: ``(subnet, result)`` with ``latency_ms`` measured beside the unpruned network
        (``reference_ms``) and ``memory_mb``. The latencies are drift-corrected (round by round:
        :func:`targets.meter.paired_drift_corrected`) to the reference's speed on the machine undisturbed
        (:func:`targets.meter.quiet_latency`), which also anchors the top of the fit as the
        unpruned network's own measurement, which counts as many samples as there are: it rests on the readings
        beside every sample (unweighted, a fit missed it by 3.5 %: ``benchmarks/bench_calibration_anchor.py``)."""
        refs = [r["reference_ms"] for _, r in rows]
        speed = quiet_latency(refs)  # the unpruned network's latency at calibration time, machine undisturbed
        full = self._unpruned()
        lat = self.set_calibration("latency", [self.raw_latency(s) for s, _ in rows] + [self.raw_latency(full)],
                                   [paired_drift_corrected(r, speed) for _, r in rows] + [speed],
                                   degree=2, weights=[1.0] * len(rows) + [float(max(1, len(rows)))])
        lat["reference_ms"] = speed
        for sample, (s, r) in zip(lat["samples"], rows):
            sample.update(subnet=s.to_dict(), measured_raw=r["latency_ms"], reference_ms=r["reference_ms"],
                          ratio_to_reference=float(paired_ratio(r)))
        lat["samples"][-1].update(subnet=full.to_dict(), reference=True)
        mem = self.set_calibration("memory", [self.raw_memory(s) for s, _ in rows], [r["memory_mb"] for _, r in rows])
        for sample, (s, _) in zip(mem["samples"], rows):
            sample["subnet"] = s.to_dict()
        return {"latency": lat, "memory": mem}

    def validate_from(self, rows, space: str | None = None, seed: int | None = None) -> dict:
        """Prediction error on held-out end-to-end ``rows`` (as :meth:`calibrate_from`'s), stored in
        :attr:`validation`: MAPE, max error, share within +-5 % and +-10 %, for latency and memory, with every
        sample; for latency also drift-corrected, the residuals the latency bound uses, and the unpruned network."""
        out = {}
        refs = [r["reference_ms"] for _, r in rows]
        for kind, key, pred in (("latency", "latency_ms", self.predict_latency),
                                ("memory", "memory_mb", self.predict_memory)):
            p = [pred(s) for s, _ in rows]
            m = [r[key] for _, r in rows]
            stats = error_stats(p, m)
            stats["samples"] = [{"subnet": s.to_dict(), "predicted": float(a), "measured": float(b)}
                                for (s, _), a, b in zip(rows, p, m)]
            if kind == "latency":  # the same, with each measurement scaled to the calibration's machine speed
                speed = (self.calibration.get("latency") or {}).get("reference_ms")
                for sample, (_, r) in zip(stats["samples"], rows):  # retaken: the machine was disturbed
                    sample.update({k: r[k] for k in ("retaken", "disturbed_ms") if k in r},
                                  reference_ms=float(r["reference_ms"]), ratio_to_reference=float(paired_ratio(r)))
                if speed:
                    stats["drift_corrected"] = error_stats(p, [paired_drift_corrected(r, speed) for _, r in rows])
                    stats["drift_corrected"]["method"] = DRIFT_CORRECTED_METHOD
                # relative errors per sample, drift-corrected: what an upper bound of a prediction is taken from
                stats["residuals"], stats["residuals_method"] = residuals_of(stats["samples"], speed)
                # the unpruned network itself: measured beside every sample, compared with its prediction
                stats["unpruned"] = {"predicted": float(pred(self._unpruned())), "measured": float(np.median(refs)),
                                     "n": len(refs)}
            out[kind] = stats
        out["space"] = space
        out["seed"] = seed
        self.validation.clear()
        self.validation.update(out)
        return out

    def fit_end_to_end(self) -> bool:
        """A table from a profiling bundle carries the end-to-end measurements of its calibration and validation
        sub-networks (``end_to_end``, measured on the device, some at other lengths) but no fit (the device has no
        nasprune): fit both here, at every length, as a host profile does. Returns whether it did (once: a fitted
        table is left as it is)."""
        e2e = self.data.get("end_to_end")
        if not e2e or (self.calibration.get("latency") or {}).get("n"):
            return False
        for n in self.lengths():
            def rows(name):
                return [(SubNetwork.from_dict(r["subnet"]), r) for r in e2e.get(name) or ()
                        if int(r.get("length", self.sequence_length)) == n]

            view = self.at_length(n)
            if rows("calibration"):
                view.calibrate_from(rows("calibration"))
                for kind in ("latency", "memory"):
                    view.calibration[kind]["where"] = (f"fitted by nasprune on the {e2e.get('where', 'device')}'s "
                                                       "measurements")
            if rows("validation"):
                view.validate_from(rows("validation"), space=e2e.get("space"), seed=e2e.get("seed"))
        return True

    # ----------------------------------------------------------------------------------- sequence lengths
    @property
    def sequence_length(self) -> int:
        """The length this table (or view) predicts at: the target's when it was profiled, else the view's."""
        return int(self.fingerprint.get("sequence_length") or 128)

    def lengths(self) -> list[int]:
        """The sequence lengths this table was measured at (its own, and ``lengths.at``'s)."""
        own = (self._parent or self).sequence_length
        return sorted({own, *(int(n) for n in (((self._parent or self).data.get("lengths") or {}).get("at") or {}))})

    def covers(self, length: int) -> bool:
        """Whether :meth:`at_length` can predict at ``length`` (between the shortest and the longest measured)."""
        ls = self.lengths()
        return ls[0] <= int(length) <= ls[-1]

    def at_length(self, length: int) -> "LatencyTable":
        """This table at sequence ``length``: a measured length's blocks, calibration and validation (a view that
        shares them: fitting it fills this table), or between two measured lengths their linear interpolation
        (blocks, base and calibration coefficients; the latency bound takes both neighbours' residuals). Its
        fingerprint says ``length``. Outside the measured lengths: :class:`TableError`."""
        root, n = self._parent or self, int(length)
        if n == root.sequence_length:
            return root
        at = (root.data.get("lengths") or {}).get("at") or {}
        fp = {**root.fingerprint, "sequence_length": n}
        if str(n) in at:
            part = at[str(n)]
            data = {**root.data, "base": part["base"], "blocks": part["blocks"], "fingerprint": fp,
                    "calibration": part.setdefault("calibration", {}), "validation": part.setdefault("validation", {})}
        elif root.covers(n):
            ls = root.lengths()
            lo = max(x for x in ls if x < n)
            hi = min(x for x in ls if x > n)
            a, b, w = root.at_length(lo), root.at_length(hi), (n - lo) / (hi - lo)

            def mix(x, y):
                return (np.asarray(x, float) * (1 - w) + np.asarray(y, float) * w).tolist()

            cal = {kind: {**{k: float(mix(a.calibration.get(kind, {}).get(k, d), b.calibration.get(kind, {}).get(k, d)))
                             for k, d in (("a", 1.0), ("b", 0.0), ("c", 0.0), ("raw_min", 0.0))},
                          "n": min(a.calibration.get(kind, {}).get("n", 0), b.calibration.get(kind, {}).get("n", 0)),
                          "interpolated": [lo, hi]} for kind in ("latency", "memory")}
            (ra, ma), (rb, _) = a.latency_residuals(), b.latency_residuals()
            data = {**root.data, "fingerprint": fp, "calibration": cal,
                    "base": {k: float(mix(a.data["base"][k], b.data["base"][k])) for k in a.data["base"]},
                    "blocks": {k: mix(a.data["blocks"][k], b.data["blocks"][k]) for k in BLOCKS},
                    "validation": {"interpolated": [lo, hi], "latency": {"residuals": ra + rb,
                                                                         "residuals_method": ma}}}
        else:
            ls = root.lengths()
            raise TableError(f"latency table {root.path or ''} covers sequence lengths {ls[0]} to {ls[-1]}, not {n}")
        data.pop("lengths", None)
        data.pop("end_to_end", None)
        view = LatencyTable(data, root.path)
        view._parent = root
        return view

    def reference_readings(self) -> list[float]:
        """The unpruned network's latencies at this length, measured beside every calibration and validation
        sub-network (ms): how steady the machine was while the table was calibrated (:meth:`steadiness`)."""
        return [float(x["reference_ms"]) for part in (self.calibration, self.validation)
                for x in (part.get("latency") or {}).get("samples", []) if "reference_ms" in x]

    def steadiness(self, tolerance: float = 0.05) -> dict:
        """``{"share", "n", "tolerance"}``: the share of :meth:`reference_readings` within ``tolerance`` of their
        median (:func:`targets.meter.repeatability`); ``share`` is ``None`` without readings."""
        refs = self.reference_readings()
        return {"share": repeatability(refs, tolerance) if refs else None, "n": len(refs), "tolerance": tolerance}

    def summary(self) -> str:
        fp = self.fingerprint
        lines = [f"latency table {self.path or ''}",
                 f"  target {fp.get('target')} / {fp.get('provider')} / {fp.get('precision')} / {fp.get('threads')} "
                 f"threads / ORT {fp.get('onnxruntime')} / {fp.get('cpu_model')}",
                 f"  grid {len(self.heads_grid)} heads x {len(self.units_grid)} units, base "
                 f"{self.data['base']['latency_ms']:.2f} ms"]
        cal = self.calibration.get("latency") or {}
        lines.append(f"  calibration: {cal.get('n', 0)} end-to-end samples"
                     + (f" ({cal['where']})" if cal.get("where") else "") if cal.get("n") else
                     "  calibration: none (predictions are the sum of the blocks)")
        steady = self.steadiness()
        if steady["share"] is not None:
            lines.append(f"  machine: the unpruned network, measured beside the samples, repeated within ±5 % of its "
                         f"median in {100 * steady['share']:.0f} % of {steady['n']} readings"
                         + (" (a busy machine: figures checked on it are uncertain beyond ±5 %)"
                            if steady["share"] < STEADY_SHARE else ""))
        for kind, v in self.validation.items():
            if not isinstance(v, dict):  # "space", "seed"
                continue
            # drift-corrected: each measurement rescaled by the unpruned network measured beside it (see profile)
            for name, w in ((kind, v), (f"{kind}, drift-corrected", v.get("drift_corrected") or {})):
                if "mape" in w:
                    lines.append(f"  {name}: MAPE {w['mape']:.1f}%, within 5% {100 * w['within_5']:.0f}%, within 10% "
                                 f"{100 * w['within_10']:.0f}% (n={w['n']})")
        return "\n".join(lines)


DRIFT_CORRECTED_METHOD = ("unpruned latency at calibration x the median over the rounds of (measured / unpruned latency "
                          "measured just before it): targets.meter.paired_drift_corrected")
RESIDUALS_DRIFT_CORRECTED = f"({DRIFT_CORRECTED_METHOD}) / predicted - 1"
RESIDUALS_RAW = "measured / predicted - 1 (not drift-corrected: the samples have no reference measurement)"


def residuals_of(samples: list[dict], speed_ms: float | None) -> tuple[list[float], str]:
    """Relative errors ``measured / predicted - 1`` of validation ``samples`` (``predicted``, ``measured``,
    ``reference_ms``), each measurement drift-corrected to the machine speed at which the unpruned network takes
    ``speed_ms`` (the calibration's) where the samples and ``speed_ms`` allow; and which of the two they are."""
    corrected = bool(speed_ms) and all(s.get("reference_ms") for s in samples)
    measured = [(speed_ms * s["ratio_to_reference"] if "ratio_to_reference" in s else  # paired, since stored
                 drift_corrected([s["measured"]], [s["reference_ms"]], speed_ms)[0]) if corrected else s["measured"]
                for s in samples]
    return ([float(m / s["predicted"] - 1.0) for m, s in zip(measured, samples)],
            RESIDUALS_DRIFT_CORRECTED if corrected else RESIDUALS_RAW)


def error_stats(predicted, measured) -> dict:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if not len(p):
        return {"n": 0}
    rel = np.abs(p - m) / np.maximum(np.abs(m), 1e-12)
    return {"n": int(len(p)), "mape": float(100 * rel.mean()), "max_ape": float(100 * rel.max()),
            "within_5": float(np.mean(rel <= 0.05)), "within_10": float(np.mean(rel <= 0.10))}
