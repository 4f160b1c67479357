"""What a person looks at first: ``pareto.png`` and ``report.html`` in the run folder (:func:`write_report`)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from targets.meter import disturbed  # noqa: E402
from toolchain.ship.export import ExportResult  # noqa: E402
from toolchain.ship.selection import Selection, judged_latency  # noqa: E402
from toolchain.ship.manifest import TWINS, twin_comparison  # noqa: E402

# candidates and front at the table's prediction; exported points (shipped, the unpruned star) at what they measured
AXIS_LABELS = {"latency": "latency on target (ms): predicted; exported points: measured",
               "memory": "memory (MB): predicted; exported points: measured",
               "params": "parameters (millions)", "error": "validation error (1 - metric)"}


def _x(record: dict, axis: str) -> float:
    v = record[axis]
    return v / 1e6 if axis == "params" else v


def pareto_plot(path: str | Path, records: list[dict], pareto: list[dict], *, x_axis: str = "latency",
                metric_name: str = "metric", budget: float | None = None, unpruned: dict | None = None,
                shipped: list[dict] | None = None, shipped_label: str = "shipped (exported ONNX)",
                title: str = "", x_label: str | None = None) -> Path:
    """Scatter of every evaluated candidate, the Pareto front, the budget line, the unpruned model, shipped points.

    ``records``/``pareto``/``unpruned`` are dicts with ``x_axis`` and ``error`` keys (``unpruned`` may carry its
    legend ``label``); ``shipped`` dicts also carry ``measured_latency_ms``, ``label`` (a line of the legend) and
    ``id`` (written beside the marker; default: the label). ``x_label``: the x axis' (default:
    :data:`AXIS_LABELS`).
    """
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    xs = [_x(r, x_axis) for r in records]
    ax.scatter(xs, [1 - r["error"] for r in records], s=10, c="#b0b0b0",
               label=f"evaluated candidates, shared weights ({len(records)})", zorder=1)
    front = sorted(pareto, key=lambda r: r[x_axis])
    ax.step([_x(r, x_axis) for r in front], [1 - r["error"] for r in front], where="post", c="#1f77b4", lw=1.8,
            zorder=2)
    ax.scatter([_x(r, x_axis) for r in front], [1 - r["error"] for r in front], s=28, c="#1f77b4",
               label=f"Pareto front, shared weights ({len(front)})", zorder=3)
    if budget is not None:
        ax.axvline(budget / 1e6 if x_axis == "params" else budget, c="#d62728", ls="--", lw=1.5,
                   label=f"budget ({budget:g}{' ms' if x_axis == 'latency' else ''})")
        ax.axvspan(budget, ax.get_xlim()[1] if xs else budget, color="#d62728", alpha=0.06, zorder=0)
    if unpruned is not None:
        ax.scatter([_x(unpruned, x_axis)], [1 - unpruned["error"]], marker="*", s=220, c="#ff7f0e",
                   edgecolors="k", label=unpruned.get("label", "unpruned model"), zorder=4)
    for i, s in enumerate(shipped or []):
        ax.scatter([_x(s, x_axis)], [1 - s["error"]], marker="D", s=70, c="#2ca02c", edgecolors="k", zorder=5,
                   label=shipped_label if i == 0 else None)
        # beside the marker only its id (shipped points lie close together: long labels overlapped); the whole
        # label is a line of the legend
        label = s.get("label", "")
        ax.annotate(s.get("id", label), (_x(s, x_axis), 1 - s["error"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8, color="#1a6e1a", zorder=6)  # over a neighbour's marker
        if label:
            ax.plot([], [], " ", label=label)
    ax.set_xlabel(x_label or AXIS_LABELS.get(x_axis, x_axis))
    ax.set_ylabel(f"validation {metric_name}")
    ax.set_title(title or "nasprune: accuracy vs cost of every evaluated sub-network", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def html_report(path: str | Path, *, title: str, png: Path, settings: dict, shipped_rows: list[dict],
                rejected_rows: list[dict], notes: list[str]) -> Path:
    """A single self-contained HTML page (the plot is embedded)."""
    img = base64.b64encode(Path(png).read_bytes()).decode()
    cols = ["point", "precision", "parameters", "predicted latency (ms)", "measured latency (ms)",
            "drift-corrected (ms)", "measured at other lengths (tokens: ms)", "memory (MB)", "metric before recovery",
            "dev metric", "metric", "origin", "path", "not shipped because"]

    def table(rows):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    settings_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                            for k, v in settings.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px;text-align:left}}
th{{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1>
<img src="data:image/png;base64,{img}" alt="Pareto front" style="max-width:100%">
<h2>Shipped points</h2>{table(shipped_rows) if shipped_rows else "<p>none</p>"}
{"<h2>Not shipped</h2>" + table(rejected_rows) if rejected_rows else ""}
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>
<h2>Settings</h2><table>{settings_html}</table>
</body></html>"""
    path = Path(path)
    path.write_text(page)
    return path


def _x_label(x_axis: str, placed: str | None) -> str | None:
    """The x axis of pareto.png when the search placed candidates in their fastest precision
    (``settings["search_latency"]``, :class:`latency_models.precisions.FastestPrecision`)."""
    if x_axis not in ("latency", "memory") or not placed or not placed.startswith("the fastest"):
        return None
    return AXIS_LABELS[x_axis].replace("predicted;", f"predicted in {placed};")


def write_report(folder: Path, result, front: list[dict], selection: Selection, unpruned: dict, settings: dict,
                 timings: dict, *, metric_name: str, full) -> None:
    """``pareto.png`` and ``report.html`` of a run: every candidate of the search ``result`` (records, objectives,
    method, hypervolume), the validated ``front``, the points of ``selection`` (shipped and rejected), the
    ``unpruned`` export's figures (``full``: the unpruned sub-network), the run ``settings`` and ``timings``."""
    x_axis = next((o for o in result.objectives if o != "error"), "latency")
    budget = {"latency": settings["max_latency_ms"], "memory": settings["max_memory_mb"],
              "params": settings["max_params"]}.get(x_axis)
    records = result.records
    shipped_rows, shipped_pts = [], []
    for res in selection.shipped:
        shipped_pts.append(shipped_marker(res, x_axis, settings.get("precision")))
        shipped_rows.append(_row(res, folder, full))
    rejected_rows = [_row(r, folder, full) for r, _ in selection.rejected]
    # the unpruned model as exported (recovered when the shipped points beside it are), else its shared-weight score
    if unpruned.get("metric") is None:
        unpruned_pt = next(({**r, "label": "unpruned model (shared weights)"} for r in records
                            if r["subnet"] == full), None)
    else:
        unpruned_pt = unpruned_marker(unpruned)
        if x_axis == "memory":
            unpruned_pt = None if unpruned.get("measured_memory_mb") is None else \
                {**unpruned_pt, "memory": unpruned["measured_memory_mb"]}
    png = pareto_plot(folder / "pareto.png", records, front, x_axis=x_axis, metric_name=metric_name, budget=budget,
                      unpruned=unpruned_pt, shipped=shipped_pts,
                      shipped_label=_exported("shipped", bool(selection.shipped) and all(
                          r.metric_before_recovery is not None for r in selection.shipped)),
                      title=f"{settings['task']} on {settings['target']} ({settings['precision']}): "
                            f"{len(records)} sub-networks evaluated, {len(front)} on the front",
                      x_label=_x_label(x_axis, settings.get("search_latency")))
    notes = [
        f"Search: {result.method}, {len(records)} candidates, hypervolume {result.hypervolume:.4f} "
        f"(normalised by the unpruned network; reference point {result.reference_point}).",
        f"Accuracy on the plot: validation subsample during search; shipped points: full validation set "
        f"measured on the exported ONNX model (after recovery, where the 'metric before recovery' column is "
        f"filled: the shared-weight metric of the same sub-network before it was distilled from the full network). "
        f"'metric': on the validation set and unused training examples where 'dev metric' differs from it; the "
        f"shipped points are chosen by it (toolchain.heldout), so on the plot's dev axis a shipped point can look "
        f"dominated by another that it beats on that metric. Shipped points sit at their measured latency, "
        f"drift-corrected where the unpruned network beside them read the machine disturbed (what they were judged "
        f"by).",
        f"Unpruned model: {unpruned['parameters'] / 1e6:.2f}M parameters, {unpruned['measured_latency_ms']:.2f} ms "
        f"measured, metric {_fmt(unpruned['metric'])}"
        + (f" ({_fmt(unpruned['metric_before_recovery'])} before recovery)"
           if unpruned.get("metric_before_recovery") is not None else "")
        + f", on dev alone {_fmt(unpruned.get('metric_dev'))}.",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
    ]
    if _x_label(x_axis, settings.get("search_latency")):
        notes.insert(1, f"Candidates on the plot sit at their predicted latency in {settings['search_latency']} (one "
                        "latency table per precision): each chosen sub-network is exported and measured in every "
                        "precision, and the shipped set is the Pareto set across them.")
    html_report(folder / "report.html", title=f"nasprune report: {settings['task']} on {settings['target']}",
                png=png, settings=settings, shipped_rows=shipped_rows, rejected_rows=rejected_rows, notes=notes)


def shipped_marker(res: ExportResult, x_axis: str, precision: str | None) -> dict:
    """Where a shipped point sits on ``pareto.png``: at what it was judged by (:func:`judged_latency`: measured,
    drift-corrected where the machine was disturbed during the reading; predicted where nothing was measured, not
    on the target) and its dev metric (the scale of the search's points), with its legend line."""
    info = res.info
    lat = judged_latency(res)
    score = res.metric_dev
    pred = info.get("predicted") or {}
    rank = res.point_id[:2]
    label = (f"{rank}: {lat:.1f} ms measured" + (" (drift-corrected: machine disturbed)"
                                                  if lat != res.measured_latency_ms else "") if lat else rank)
    return {x_axis: (lat or pred.get("latency_ms")) if x_axis == "latency" else
            ((res.measured_memory_mb or pred.get("memory_mb")) if x_axis == "memory" else res.parameters),
            "error": 1 - score if score is not None else pred.get("error"), "id": rank,
            "label": label + ("" if info.get("precision") == precision else f" ({info.get('precision')})")}


def unpruned_marker(unpruned: dict) -> dict:
    """Where the exported unpruned model sits on ``pareto.png`` (``unpruned``: the export stage's figures of it): at
    its measured latency, or drift-corrected where its own reading was off the calibration's speed
    (:func:`targets.meter.disturbed`), as the shipped points beside it (:func:`shipped_marker`)."""
    raw, corrected = unpruned.get("measured_latency_ms"), unpruned.get("measured_latency_drift_corrected_ms")
    busy = bool(raw and corrected and disturbed(raw, corrected))
    return {"latency": (corrected if busy else raw) or unpruned["predicted_latency_ms"], "memory": None,
            "params": unpruned["parameters"], "error": 1 - unpruned["metric_dev"],
            "label": _exported("unpruned model", unpruned.get("metric_before_recovery") is not None)
            + (f": {raw:.1f} ms measured, drawn drift-corrected (machine disturbed)" if busy else "")}


def _fmt(metric: float | None) -> str:
    return "unknown" if metric is None else f"{metric:.4f}"


def _exported(what: str, recovered: bool) -> str:
    """A legend entry of exported points, which says whether their metric is after recovery."""
    return f"{what} (exported ONNX{', recovered' if recovered else ''})"


def _row(res: ExportResult, folder: Path, full) -> dict:
    pred = (res.info.get("predicted") or {}).get("latency_ms")
    meas = res.info.get("measured") or {}
    drift = meas.get("latency_drift_corrected_ms")
    where = "" if res.info.get("measured_on_target", True) else " (here, not on the target)"
    score = (res.metric or {}).get("score")
    before = res.metric_before_recovery
    twin = (res.info.get("extra") or {}).get("uniform_twin") or {}
    origin = "the unpruned network" if res.subnet == full else "search" if twin.get("chosen") not in TWINS else (
        f"{TWINS[twin['chosen']]} of the search's {twin['point']} ({twin_comparison(twin, chosen=True)})")
    return {"point": res.point_id, "precision": res.info.get("precision", ""), "origin": origin,
            "parameters": f"{res.parameters / 1e6:.2f}M",
            "predicted latency (ms)": f"{pred:.2f}" if pred is not None else "",
            "measured latency (ms)": f"{res.measured_latency_ms:.2f}{where}" if res.measured_latency_ms else "",
            "drift-corrected (ms)": f"{drift:.2f}" if drift else "",
            "measured at other lengths (tokens: ms)": ", ".join(
                f"{n}: {ms:.2f}" for n, ms in (meas.get("latency_by_length_ms") or {}).items()),
            "memory (MB)": f"{res.measured_memory_mb:.1f}" if res.measured_memory_mb else "",
            "metric before recovery": f"{before:.4f}" if before is not None else "",
            "not shipped because": res.info.get("infeasible_reason") or "",
            "metric": f"{score:.4f}" if score is not None else "",
            "dev metric": f"{res.metric_dev:.4f}" if res.metric_dev is not None else "",
            "path": str(Path(res.path).resolve().relative_to(folder.resolve())) if folder in Path(res.path).parents
            else str(res.path)}
