"""Profiling, latency tables, predictors, resume, bundles (tiny configs: timings are tiny and noisy, so the
assertions are about structure and robust sanity, not tight error bounds)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from latency_models import FingerprintMismatchWarning, LatencyTable, TableError
from latency_models.bundle_runner import partial_path_for
from targets import load_target
from toolchain.core.modeling import ModelDims, model_from_config, tiny_config
from toolchain.core.search_space import layer_parameters, make_space
from toolchain.core.subnetwork import SubNetwork

FAST = {"warmup": 2, "min_reps": 5, "min_time_s": 0.02, "max_reps": 200}
TARGET_TOML = """
name = "tiny-cpu"
providers = ["CPUExecutionProvider"]
batch_size = 1
sequence_length = 32
precisions = ["fp32", "int8"]
intra_op_threads = 1
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("latency")
    (d / "tiny.toml").write_text(TARGET_TOML)
    cfg = tiny_config(hidden_size=32, num_attention_heads=2, intermediate_size=16, num_hidden_layers=3)
    return d, load_target(d / "tiny.toml"), cfg, ModelDims.from_config(cfg)


@pytest.fixture(scope="module")
def table(setup):
    from latency_models.profile import profile

    d, target, cfg, dims = setup
    import torch

    torch.manual_seed(0)
    model = model_from_config(copy.deepcopy(cfg)).eval()
    return profile(dims, target, "fp32", d / "table.json", model_config=cfg, unit_step=8, progress=False,
                   measurement=FAST, model=model, calibrate_samples=3, validate_samples=2)


def test_profile_writes_a_complete_table(setup, table):
    d, target, cfg, dims = setup
    assert table.heads_grid == [0, 1, 2] and table.units_grid == [0, 8, 16]
    loaded = LatencyTable.load(d / "table.json")
    assert not partial_path_for(d / "table.json").exists()
    data = loaded.data
    assert data["fingerprint"]["precision"] == "fp32" and data["fingerprint"]["threads"] == 1
    assert data["fingerprint"]["sequence_length"] == 32
    assert data["measurement"]["statistic"] == "median" and "memory_method" in data["measurement"]
    assert data["base"]["latency_ms"] > 0 and data["base"]["memory_mb"] > 0
    assert data["blocks"]["latency_ms"][0][0] == 0.0  # a dropped layer costs nothing
    # weights are the initializer bytes of the exported graphs: about the layer's parameters x 4 bytes (fp32;
    # ORT's fusion folds a few constants differently with and without an encoder layer)
    full_w = data["blocks"]["weights_mb"][-1][-1] * 1e6
    assert full_w == pytest.approx(4 * layer_parameters(32, 16, 2, 16), rel=0.05)
    # three sampled sub-networks, and the latency fit also has the unpruned network (measured beside each of them)
    assert data["calibration"]["latency"]["n"] == 4 and data["calibration"]["memory"]["n"] == 3
    for kind in ("latency", "memory"):
        v = data["validation"][kind]
        assert v["n"] == 2 and 0 <= v["within_5"] <= v["within_10"] <= 1 and len(v["samples"]) == 2
    # each sub-network is measured beside the unpruned network; the calibration is fitted on drift-corrected values
    cal = data["calibration"]["latency"]
    assert cal["reference_ms"] > 0
    *samples, anchor = cal["samples"]
    for sample in samples:  # round by round: each reading over the reference's just before it, their median
        assert sample["measured"] == pytest.approx(sample["ratio_to_reference"] * cal["reference_ms"])
    assert anchor["reference"] and anchor["measured"] == cal["reference_ms"]
    assert anchor["weight"] == len(samples) and all("weight" not in x for x in samples)  # rests on every reading
    assert anchor["subnet"] == SubNetwork.full(3, 2, 16).to_dict()
    dc = data["validation"]["latency"]["drift_corrected"]
    assert dc["n"] == 2 and 0 <= dc["within_5"] <= dc["within_10"] <= 1
    assert f"latency, drift-corrected: MAPE {dc['mape']:.1f}%" in loaded.summary()
    u = data["validation"]["latency"]["unpruned"]
    assert u["n"] == 2 and u["measured"] > 0 and u["predicted"] == pytest.approx(loaded.predict_latency(SubNetwork.full(3, 2, 16)))


def test_quadratic_calibration(table):
    """Degree 2 fits a curve that rises faster than the sum of the blocks, and falls back to the line
    where the curve would fall somewhere in the measured range, or with too few samples."""
    t = copy.deepcopy(table)
    raw = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    cal = t.set_calibration("latency", raw, [0.1 * r * r + r + 0.5 for r in raw], degree=2)
    assert cal["c"] == pytest.approx(0.1) and cal["a"] == pytest.approx(1.0) and cal["b"] == pytest.approx(0.5)
    assert t._calibrated("latency", 7.0) == pytest.approx(0.1 * 49 + 7 + 0.5)
    falling = [10 - (r - 3) ** 2 for r in raw]  # peaks inside the range: not a latency curve
    assert t.set_calibration("latency", raw, falling, degree=2)["c"] == 0.0
    assert t.set_calibration("latency", raw[:4], [0.1 * r * r for r in raw[:4]], degree=2)["c"] == 0.0
    assert t.set_calibration("latency", raw, [2 * r for r in raw])["c"] == 0.0  # degree 1 by default
    # one sample measured while the machine was busy (+60 %) barely moves the fit; least squares would tilt it
    raw9 = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    busy = [(2 * r + 1) * (1.6 if r == 4.5 else 1.0) for r in raw9]
    cal = t.set_calibration("latency", raw9, busy)
    assert cal["a"] == pytest.approx(2.0, rel=0.02) and cal["b"] == pytest.approx(1.0, abs=0.05)
    assert abs(np.polyfit(raw9, busy, 1)[0] - 2.0) > 0.3 and "robust" in cal["method"]
    # a sample that counts as many (the unpruned network: its reading rests on those beside every sample) pulls the
    # fit to itself; unweighted, the fit goes by the others
    off = [2 * r + 1 for r in raw9[:-1]] + [2 * raw9[-1] + 1 + 0.5]
    plain = t.set_calibration("latency", raw9, off, degree=2)
    heavy = t.set_calibration("latency", raw9, off, degree=2, weights=[1.0] * 8 + [8.0])
    miss = [abs(c["c"] * 25 + c["a"] * 5 + c["b"] - off[-1]) for c in (plain, heavy)]
    assert miss[1] < 0.25 * miss[0] and heavy["samples"][-1]["weight"] == 8.0


def test_an_unsound_calibration_falls_back_to_a_scale_and_never_predicts_below_zero(table):
    """A fit on a few noisy samples (a tiny model's, a few tenths of a millisecond each) can fall with the raw sum, or
    cross zero just below the samples: a falling or non-positive line becomes a pure scale, and below the smallest
    sample a prediction is at least that sample's in proportion, so no sub-network is predicted at <= 0 ms."""
    t = copy.deepcopy(table)
    falling = t.set_calibration("latency", [0.10, 0.12, 0.15, 0.20], [0.16, 0.15, 0.15, 0.14])  # the CI's 3 + anchor
    assert falling["b"] == 0.0 and falling["a"] > 0 and "a * raw (a fitted offset was unsound" in falling["method"]
    assert t._calibrated("latency", 0.05) > 0
    steep = t.set_calibration("latency", [0.30, 0.35, 0.40, 0.45], [0.10, 0.25, 0.40, 0.55])  # 3 * raw - 0.8
    assert steep["a"] == pytest.approx(3.0, rel=0.01) and steep["b"] == pytest.approx(-0.8, abs=0.01)
    assert steep["raw_min"] == 0.30
    low = t._calibrated("latency", 0.15)  # the line gives -0.35; the smallest sample, in proportion: 0.05
    assert low == pytest.approx(0.10 * 0.15 / 0.30) and t._calibrated("latency", 0.40) == pytest.approx(0.40)
    at = [t._calibrated("latency", r) for r in np.linspace(0.01, 0.6, 60)]
    assert min(at) > 0 and all(x < y for x, y in zip(at, at[1:]))  # positive and rising everywhere


def test_calibration_samples_span_the_sizes():
    """Calibration and validation cover small and near-full networks, not just the middle of the space."""
    from latency_models.calibration import samples as _samples
    from toolchain.core.modeling import ModelDims

    dims = ModelDims(model_type="bert", num_layers=6, num_heads=12, head_size=32, hidden_size=384,
                     intermediate_size=1536, vocab_size=1000, num_labels=2)
    space = make_space("medium", dims)
    a, b = _samples(space, 10, 0), _samples(space, 10, 1)
    for subnets in (a, b):
        shares = sorted(sum(s.units) / (6 * 1536) for s in subnets)
        assert shares[0] < 0.3 and shares[-1] > 0.8 and all(s.kept_layers for s in subnets)
    assert not set(a) & set(b)  # validation (another seed) shares no sub-network with calibration
    assert _samples(space, 10, 0) == a  # seeded


def test_retaken_samples_are_not_exported_again(setup, table, monkeypatch):
    """A sample taken again (here every one: no reference reading counts as quiet) is measured from the file exported
    the first time; the export is a third of a sample's time. Beyond KEEP_BYTES a sample is exported again."""
    import latency_models.calibration as cal

    d, target, cfg, dims = setup
    torch.manual_seed(0)
    model = model_from_config(copy.deepcopy(cfg)).eval()
    space = make_space("medium", dims)
    exported = []
    real_export = cal.export_graph
    monkeypatch.setattr(cal, "export_graph", lambda m, dst, *a, **k: exported.append(dst) or real_export(m, dst, *a,
                                                                                                          **k))
    real_retake = cal.retake_disturbed
    retaken = []
    monkeypatch.setattr(cal, "retake_disturbed",
                        lambda *a, **k: retaken.append(real_retake(*a, **{**k, "tolerance": -1.0, "passes": 1})))
    t = copy.deepcopy(table)
    cal.validate(t, model, space, 2, target=target)
    others = len([n for n in t.lengths() if n != t.sequence_length])
    assert retaken == [2 + 2 * others] and len(exported) == 1 + 2  # the reference and each sample, once
    exported.clear()
    monkeypatch.setattr(cal, "KEEP_BYTES", 0)
    cal.validate(t, model, space, 2, target=target)
    assert len(exported) == 1 + 2 + 2  # kept none: each sample exported again for its retake


def test_predictions_are_sane(setup, table):
    d, target, cfg, dims = setup
    full = SubNetwork.full(3, 2, 16)
    one = SubNetwork((1, 0, 0), (8, 0, 0))
    assert table.predict_latency(full) > 0 and table.predict_memory(full) > 0
    assert table.raw_latency(full) > table.raw_latency(one)  # three full layers cost more than one small one
    assert table.weights_mb(full) > table.weights_mb(one)
    # interpolation between unit grid points lies between its neighbours
    lo, mid, hi = (table.layer_latency(2, u) for u in (8, 12, 16))
    assert min(lo, hi) - 1e-12 <= mid <= max(lo, hi) + 1e-12
    # memory is dominated by exact quantities here: the tiny model's prediction is close to the measurement
    assert table.validation["memory"]["mape"] < 25


def test_a_table_calibrated_on_a_busy_machine_says_so(table, caplog):
    """How steady the machine was: the unpruned network's readings beside the samples. Steady: nothing said; more
    than a fifth of them beyond ±5 % of their median: the compile warns and the summary says so; fewer than 8
    readings say too little to warn."""
    import logging

    from toolchain.tables import warn_if_unsteady

    def with_readings(readings):
        data = copy.deepcopy(table.data)
        cal = data["calibration"]["latency"]
        cal["samples"] = [s for s in cal["samples"] if "reference_ms" not in s]  # the unpruned anchor stays
        val = data["validation"]["latency"]
        val["samples"] = [{**val["samples"][0], "reference_ms": r} for r in readings]
        return LatencyTable(data, table.path)

    steady = with_readings([1.0, 1.01, 0.99, 1.02, 1.0, 0.98, 1.0, 1.01, 1.0, 0.99])
    busy = with_readings([1.0, 1.3, 1.0, 1.25, 1.4, 1.0, 1.35, 1.0, 1.2, 1.5])
    assert steady.steadiness() == {"share": 1.0, "n": 10, "tolerance": 0.05}
    assert busy.steadiness()["share"] == pytest.approx(0.2)  # 1.2 and 1.25 of a median of 1.225
    with caplog.at_level(logging.WARNING, logger="toolchain.tables"):
        assert not warn_if_unsteady(steady) and not caplog.records
        assert not warn_if_unsteady(with_readings([1.0, 1.3, 1.0, 1.25, 1.4]))  # 5 readings
        assert warn_if_unsteady(busy)
    assert "only 20 % of the time" in caplog.text and "quiet machine" in caplog.text
    assert "a busy machine" in busy.summary() and "busy" not in steady.summary()
    assert "in 100 % of 10 readings" in steady.summary()


def test_corrupt_and_incomplete_tables(tmp_path, table):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TableError, match="not valid JSON"):
        LatencyTable.load(bad)
    with pytest.raises(TableError, match="not found"):
        LatencyTable.load(tmp_path / "missing.json")
    data = copy.deepcopy(table.data)
    del data["blocks"]
    bad.write_text(json.dumps(data))
    with pytest.raises(TableError, match="missing key.*blocks"):
        LatencyTable.load(bad)
    data = copy.deepcopy(table.data)
    data["blocks"]["latency_ms"] = data["blocks"]["latency_ms"][:-1]
    bad.write_text(json.dumps(data))
    with pytest.raises(TableError, match="shape"):
        LatencyTable.load(bad)
    data = copy.deepcopy(table.data)
    data["grid"]["units"] = [16, 8, 0]
    bad.write_text(json.dumps(data))
    with pytest.raises(TableError, match="increasing"):
        LatencyTable.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(TableError, match="not a latency table"):
        LatencyTable.load(bad)


def test_fingerprint_mismatch_warns(setup, table):
    d, target, cfg, dims = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.check_fingerprint(target, "fp32") == {}
    other = LatencyTable(copy.deepcopy(table.data))
    other.data["fingerprint"].update(cpu_model="Some Other CPU", onnxruntime="0.0.1", threads=7)
    with pytest.warns(FingerprintMismatchWarning) as rec:
        diff = other.check_fingerprint(target, "fp32")
    msg = str(rec[0].message)
    assert set(diff) == {"cpu_model", "onnxruntime", "threads"}
    assert "cpu_model" in msg and "onnxruntime" in msg and "threads" in msg
    with pytest.warns(FingerprintMismatchWarning, match="precision"):
        table.check_fingerprint(target, "int8")


def test_interrupted_profile_resumes_without_remeasuring(setup):
    from latency_models.profile import profile

    d, target, cfg, dims = setup
    out = d / "resume.json"

    class Stop(Exception):
        pass

    first: list[str] = []

    def stop_after_3(key, result, n_done):
        first.append(key)
        if n_done == 3:
            raise Stop

    with pytest.raises(Stop):
        profile(dims, target, "fp32", out, model_config=cfg, unit_step=8, progress=False, measurement=FAST,
                on_point=stop_after_3)
    partial = partial_path_for(out)
    assert partial.is_file() and not out.exists()
    assert set(json.loads(partial.read_text())["results"]) == set(first)
    second: list[str] = []
    table = profile(dims, target, "fp32", out, model_config=cfg, unit_step=8, progress=False, measurement=FAST,
                    on_point=lambda k, r, n: second.append(k))
    assert not set(first) & set(second)  # done points are not measured again
    # the cross (base, 2 head counts, 2 unit counts, 2 diagonal cells) at the own length, 16 and 64
    assert len(first) + len(second) == 3 * 7
    assert sum(v is None for row in table.data["blocks"]["measured_latency_ms"] for v in row) == 2  # h1_u16, h2_u8
    assert out.is_file() and not partial.exists()
    assert table.predict_latency(SubNetwork.full(3, 2, 16)) > 0


def test_the_grid_off_the_cross_is_put_together_additively(setup):
    """Only the cross is measured by default; a cell off it is C(h, 0) + C(0, u) - C0, C0 from the diagonal cells,
    which keep their measurements. ``whole_grid`` measures every cell."""
    from latency_models.assemble import cross_keys, diagonal, fill_cross, grid_key
    from latency_models.grid import make_manifest

    heads, units = [0, 1, 2, 3, 4], [0, 10, 20, 30]
    true = np.array([[0.0 if not (h or u) else 1.0 + 0.5 * h + 0.1 * u for u in units] for h in heads])
    cross = cross_keys(heads, units)
    seen = np.array([[v if grid_key(h, u) in cross or not (h or u) else np.nan for u, v in zip(units, row)]
                     for h, row in zip(heads, true)])
    assert (1, 10) in diagonal(heads, units)
    seen[1, 1] = np.nan  # a diagonal cell may be missing too
    filled = np.array(fill_cross(seen, heads, units))
    assert np.allclose(filled, true)
    noisy = seen.copy()
    noisy[4, 3] += 0.3  # one diagonal cell off: kept as measured, the offset from the others' median
    assert np.allclose(np.array(fill_cross(noisy, heads, units))[np.isnan(seen)], true[np.isnan(seen)])
    d, target, cfg, dims = setup
    own = [g for g in make_manifest(dims, target, "fp32", 8)["graphs"] if "length" not in g]
    whole = [g for g in make_manifest(dims, target, "fp32", 8, whole_grid=True)["graphs"] if "length" not in g]
    assert len(own) == 1 + 6 and len(whole) == 1 + 3 * 3 - 1


def test_default_table_path(monkeypatch, tmp_path, setup):
    from latency_models.cache import cache_root, default_table_path, tables_dir
    from toolchain.pipeline import cache_dir

    d, target, cfg, dims = setup
    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path))
    assert cache_root() == cache_dir() == tmp_path and tables_dir() == tmp_path / "tables"
    p32 = default_table_path(target, "fp32", dims)
    p8 = default_table_path(target, "int8", dims)
    assert p32.parent == tmp_path / "tables" and p32.suffix == ".json" and p32 != p8
    assert p32 == default_table_path(target, None, dims)
    assert p32.stem.endswith("-residual-sum")  # the form of the graphs profiled: another form is profiled anew


def test_a_table_of_other_graphs_is_flagged(setup, table):
    """A table records the form of the graphs it was profiled on; one of another form (or from before the field:
    the fused form) warns when it is used for a target whose exported graphs are of this form."""
    import warnings

    from latency_models.cache import check_graph_form
    from latency_models.lookup_table import FingerprintMismatchWarning

    d, target, cfg, dims = setup
    assert table.data["graph_form"] == "residual-sum"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_graph_form(table, target)  # the graphs it was profiled on are the exported ones: silent
    old = LatencyTable({k: v for k, v in table.data.items() if k != "graph_form"}, d / "old.json")
    with pytest.warns(FingerprintMismatchWarning, match="'fused' form"):
        check_graph_form(old, target)


def test_sequence_longer_than_model_is_rejected(setup):
    from latency_models.grid import MicroGraphBuilder

    d, target, cfg, dims = setup
    with pytest.raises(ValueError, match="max_position_embeddings"):
        MicroGraphBuilder(dims, load_target("cpu"), "fp32", cfg)  # seq 128 > 80 positions


# ------------------------------------------------------------------------------------------------------ bundles
NO_TORCH_VENV = Path(os.environ.get("NASPRUNE_NOTORCH_VENV", Path.home() / ".cache" / "nasprune" / "venv-notorch"))


def _notorch_python() -> Path | None:
    py = NO_TORCH_VENV / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import onnxruntime, numpy"], capture_output=True).returncode == 0
    if not ok:
        shutil.rmtree(NO_TORCH_VENV, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(NO_TORCH_VENV)], check=True, capture_output=True,
                           timeout=120)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "onnxruntime", "numpy"], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError):
            return None
    if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode == 0:
        return None  # not a torch-free interpreter
    return py


@pytest.fixture(scope="module")
def bundle(setup):
    from latency_models.bundle import write_bundle

    d, target, cfg, dims = setup
    # every calibration sample at every length; 2 validation samples at the other lengths (8 by default)
    folder = write_bundle(dims, target, "int8", d / "bundle", model_config=cfg, unit_step=8, measurement=FAST,
                          progress=False, calibrate_samples=4, validate_samples=3, length_validation=2)
    return folder


def _run_bundle(python, folder: Path, out: Path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(extra_env or {})
    # run from a folder where neither nasprune nor torch can be imported by accident
    return subprocess.run([str(python), str(folder / "run_profile.py"), "--out", str(out), "--no-progress"],
                          cwd=str(folder), env=env, capture_output=True, text=True, timeout=300)


def test_bundle_contents_and_run_without_torch_import(bundle, tmp_path, setup):
    """Fast: the bundle's runner in this interpreter, with torch and nasprune made unimportable."""
    d, target, cfg, dims = setup
    names = {p.name for p in bundle.iterdir()}
    assert {"run_profile.py", "nasprune_meter.py", "nasprune_session.py", "manifest.json", "graphs",
            "README.txt"} <= names
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {g["file"] for g in manifest["graphs"]}  # one file per graph of the cross, measured at 16, 32, 64
    assert len(list((bundle / "graphs").glob("*.onnx.z"))) == len(files) == 7 and len(manifest["graphs"]) == 7 + 2 * 7
    e2e = manifest["end_to_end"]
    assert [len([e for e in e2e[k] if "length" not in e]) for k in ("calibration", "validation")] == [4, 3]
    assert [len(e2e[k]) for k in ("calibration", "validation")] == [4 + 2 * 4, 3 + 2 * 2] and e2e["reference"]["subnet"]
    block = tmp_path / "block"
    block.mkdir()
    for mod in ("torch", "toolchain", "latency_models", "targets", "transformers"):
        (block / f"{mod}.py").write_text(f"raise ImportError('{mod} must not be needed on the device')\n")
    out = tmp_path / "table.json"
    r = _run_bundle(sys.executable, bundle, out, {"PYTHONPATH": str(block)})
    assert r.returncode == 0, r.stderr
    raw = json.loads(out.read_text())
    assert raw["calibration"]["latency"]["n"] == 0 and len(raw["end_to_end"]["validation"]) == 7  # the device fits nothing
    table = LatencyTable.load(out)
    assert table.precision == "int8" and table.data["measurement"]["where"].startswith("bundle")
    assert table.fingerprint == target.fingerprint("int8") | {"target": "tiny-cpu"}
    assert table.predict_latency(SubNetwork.full(3, 2, 16)) > 0
    # read by nasprune, the device's measurements calibrate and validate it like a host profile
    cal = table.calibration["latency"]
    assert cal["n"] == 5 and cal["samples"][-1]["reference"] and "bundle" in cal["where"]
    assert table.calibration["memory"]["n"] == 4
    v = table.validation["latency"]
    assert v["n"] == 3 and len(v["residuals"]) == 3 and v["drift_corrected"]["n"] == 3
    assert table.validation["memory"]["n"] == 3 and table.validation["space"] == "medium"
    assert "calibration" in table.summary()
    assert table.lengths() == [16, 32, 64]
    for n in (16, 64):  # and at the other lengths, from the samples measured there
        at = table.at_length(n)
        assert at.calibration["latency"]["n"] == 5 and at.validation["latency"]["n"] == 2
        assert at.fingerprint["sequence_length"] == n


def test_bundle_graphs_are_small_and_materialize_exactly(setup, bundle, tmp_path):
    """A bundle stores each graph without its weights' bytes (zeroed and compressed) and the device puts back
    seeded values: the graph it gets is byte for byte the graph nasprune built with those values, weights inline."""
    import onnx
    import onnxruntime as ort

    from latency_models.bundle import store_seeded
    from latency_models.bundle_runner import materialize, seeded_bytes
    from latency_models.grid import export_graph

    d, target, cfg, dims = setup
    torch.manual_seed(0)
    model = model_from_config(tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                          num_hidden_layers=2, vocab_size=2000)).eval()
    src = export_graph(model, tmp_path / "model.onnx", "fp32", target)
    weights = store_seeded(src, tmp_path / "model.onnx.z", seed=3)
    stored = (tmp_path / "model.onnx.z").stat().st_size
    assert weights["regions"] and stored < src.stat().st_size / 10
    back = onnx.load(str(materialize(tmp_path / "model.onnx.z", weights, tmp_path / "back.onnx")))
    orig = onnx.load(str(src))
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in orig.graph.node]
    big = [t for t in back.graph.initializer if len(t.raw_data) >= 1024]
    assert len(big) == len(weights["regions"])
    for i, t in enumerate(big):  # every large initializer holds its seeded values; small ones are untouched
        assert t.raw_data == seeded_bytes(3, i, len(t.raw_data), weights["regions"][i][2])
    small = {t.name: t.raw_data for t in orig.graph.initializer if len(t.raw_data) < 1024}
    assert all(t.raw_data == small[t.name] for t in back.graph.initializer if t.name in small)
    s = ort.InferenceSession(str(tmp_path / "back.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones((1, 8), dtype=np.int64) for i in s.get_inputs()}
    assert np.isfinite(s.run(None, feed)[0]).all()
    a = seeded_bytes(3, 0, 4096, "float32")
    assert a == seeded_bytes(3, 0, 4096, "float32") and a != seeded_bytes(3, 1, 4096, "float32")
    assert np.abs(np.frombuffer(a, np.float32)).max() <= 0.04


@pytest.mark.slow
def test_bundle_in_torch_free_venv(bundle, tmp_path):
    py = _notorch_python()
    if py is None:
        pytest.skip("could not create a torch-free venv with onnxruntime + numpy (offline?)")
    out = tmp_path / "table.json"
    r = _run_bundle(py, bundle, out)
    assert r.returncode == 0, r.stderr
    table = LatencyTable.load(out)
    assert table.heads_grid == [0, 1, 2] and table.units_grid == [0, 8, 16]
    assert table.predict_latency(SubNetwork.full(3, 2, 16)) > 0
    assert table.predict_memory(SubNetwork((2, 0, 1), (16, 0, 8))) > 0


def test_profile_unavailable_provider_suggests_bundle(setup, tmp_path):
    import onnxruntime as ort

    from latency_models.profile import profile
    from targets import ProviderUnavailableError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    d, target, cfg, dims = setup
    with pytest.raises(ProviderUnavailableError, match="bundle"):
        profile(dims, "cuda", "fp16", tmp_path / "t.json", model_config=cfg, progress=False)


# ------------------------------------------------------------------------------------------------ interpolation
def _table_of(f, heads, units, calibration=None) -> LatencyTable:
    """A table whose block grids are ``f(h, u)`` (dropped layer: 0)."""
    grid = [[0.0 if h == 0 and u == 0 else f(h, u) for u in units] for h in heads]
    return LatencyTable({
        "format": "nasprune.latency_table", "version": 1, "model": {}, "measurement": {},
        "fingerprint": {"precision": "fp32", "provider": "CPUExecutionProvider", "onnxruntime": "1", "threads": 1},
        "grid": {"heads": heads, "units": units}, "base": {"latency_ms": 2.0, "memory_mb": 30.0, "weights_mb": 10.0},
        "blocks": {"latency_ms": grid, "weights_mb": grid, "working_mb": grid},
        "calibration": calibration or {}})


def test_interpolation_is_bilinear_with_the_dropped_cell_left_out():
    """Between grid points the block costs are interpolated linearly over units and heads (exact for a bilinear
    cost); cell (0, 0) is a dropped layer, so next to it the nearest real block stands in; outside, the edge."""
    def f(h, u):
        return 1.0 + 0.5 * h + 0.01 * u + 0.002 * h * u

    t = _table_of(f, [0, 2, 4], [0, 8, 16])  # an incomplete head grid: interpolated over heads too
    for h, u in ((3, 12), (2, 4), (4, 9), (3, 0), (0, 12), (2, 16)):
        assert t.layer_latency(h, u) == pytest.approx(f(h, u), abs=1e-9)
    assert t.layer_latency(0, 0) == 0.0
    assert t.layer_latency(0, 4) == pytest.approx(f(0, 8), abs=1e-9)  # (0, 0) replaced by (0, 8) along the units
    assert t.layer_latency(1, 0) == pytest.approx(f(2, 0), abs=1e-9)  # ... and by (2, 0) along the heads
    assert t.layer_latency(1, 4) == pytest.approx((2 * f(0, 8) + f(2, 0) + f(2, 8)) / 4, abs=1e-9)
    assert t.layer_latency(7, 30) == pytest.approx(f(4, 16), abs=1e-9)  # clamped to the grid
    sub = SubNetwork((3, 0, 1, 0), (12, 4, 0, 0))
    blocks = [f(3, 12), f(0, 8), f(2, 0)]
    assert t.raw_latency(sub) == pytest.approx(2.0 + sum(blocks), abs=1e-9)
    assert t.weights_mb(sub) == pytest.approx(10.0 + sum(blocks), abs=1e-9)
    assert t.raw_memory(sub) == pytest.approx(30.0 + sum(blocks) + max(blocks), abs=1e-9)
    t.calibration.update(latency={"a": 0.5, "b": 1.0, "c": 0.01}, memory={"a": 2.0, "b": -3.0})
    raw = t.raw_latency(sub)
    assert t.predict_latency(sub) == pytest.approx(0.01 * raw * raw + 0.5 * raw + 1.0, abs=1e-9)
    assert t.predict_memory(sub) == pytest.approx(2.0 * t.raw_memory(sub) - 3.0, abs=1e-9)


# ------------------------------------------------------------------------------------------------------- memory
def test_table_and_export_memory_come_from_one_meter(setup, tmp_path):
    """The profile's worker (and the bundle runner) and the export measure with targets.meter.measure: same
    quantity, same unit (MB = 10^6 bytes), on a real small BERT graph."""
    from latency_models import assemble, bundle_runner
    from latency_models.grid import Worker, export_graph, onnx_weight_bytes
    from targets import meter
    from toolchain.ship import verify

    d, target, cfg, dims = setup
    assert bundle_runner.measure_graph is meter.measure and assemble.MB == meter.MB == 1e6
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    path = export_graph(model_from_config(copy.deepcopy(cfg)).eval(), tmp_path / "m.onnx", "fp32", target)
    with Worker() as worker:  # how the table's graphs and its calibration samples are measured
        table_side = worker.measure(path, target, cfg.vocab_size, FAST)
    export_side = verify.measure_memory(path, batch=target.batch_size, seq_len=target.sequence_length,
                                        threads=target.threads, vocab_size=cfg.vocab_size)
    assert export_side["method"] == meter.MEMORY_METHOD and "MB = 1e6 bytes" in meter.MEMORY_METHOD
    for r in (table_side, export_side):
        assert r["peak_reset"] is True
        assert r["memory_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"])
        assert r["memory_mb"] * meter.MB > onnx_weight_bytes(path)  # the weights are resident while it serves
    # the same graph, the same settings, the same function: the same figure up to the noise of the allocator
    assert export_side["memory_mb"] == pytest.approx(table_side["memory_mb"], rel=0.05)
