"""Issue 20, "latency you can count on": the export measures each point in rounds beside the unpruned model (one
meter, the calibration's rounds) and reports the drift-corrected figure and latency at other lengths; the latency
table's validation residuals give an upper bound (``--latency-confidence``) the search's constraint holds for;
``--sequence-length N | data`` sets the length latency is predicted, searched and measured at; a table covers
several lengths (the cross of its grid and some end-to-end samples measured at each, interpolated between). Real targets from
TOML, tiny random-weight BERTs, real ONNX exports; no timing assertions."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from latency_models import LatencyTable
from latency_models.cache import default_table_path
from targets import TargetError, load_target, meter
from toolchain.core.modeling import ModelDims, model_from_config, tiny_config
from toolchain.core.search_space import make_space
from toolchain.core.subnetwork import SubNetwork
from toolchain.latency_settings import (References, at_length, confidence_note, data_sequence_length,
                                        export_reference, parse_sequence_length)
from toolchain.options import CompileError, CompileOptions
from toolchain.run import DataSettings

from test_latency import TARGET_TOML, _table_of  # a target at sequence length 32; a table of chosen block costs

RUNS = dict(reps=3, warmup=1)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target") / "tiny.toml"
    path.write_text(TARGET_TOML)
    return load_target(path)


# ------------------------------------------------------------------------------------------ one meter, in rounds
def test_rounds_alternate_with_the_reference_and_take_medians():
    """meter.measure_beside: reference, point, reference, point, ...; medians of each; a reference of None is the
    point itself. The calibration measures with this very function."""
    from latency_models import calibration, lookup_table

    calls, times = [], {"ref": iter([10.0, 12.0, 11.0]), "pt": iter([5.0, 7.0, 4.0])}

    def measure_one(path):
        calls.append(path)
        return {"latency_ms": next(times[path]), "memory_mb": 1.0 + len(calls)}

    r = meter.measure_beside(measure_one, "pt", "ref", rounds=3)
    assert calls == ["ref", "pt"] * 3
    assert r["latency_ms"] == 5.0 and r["rounds_ms"] == [5.0, 7.0, 4.0]
    assert r["reference_ms"] == 11.0 and r["reference_rounds_ms"] == [10.0, 12.0, 11.0]
    assert r["memory_mb"] == 3.0  # the first round's
    alone = meter.measure_beside(lambda p: {"latency_ms": 2.0}, "pt", None, rounds=2)
    assert alone["reference_rounds_ms"] == alone["rounds_ms"] == [2.0, 2.0]
    assert meter.drift_corrected([5.0, 8.0], [10.0, 16.0], 12.0) == [6.0, 6.0]
    # drift correction pairs each round with the reference read just before it: ratios 0.5, 0.583, 0.364
    assert meter.paired_ratio(r) == 0.5 and meter.paired_drift_corrected(r, 12.0) == 6.0
    # the first round disturbed (6.9 beside 10.6, then 6.8 and 6.4 beside 9.5): ratios 0.651, 0.716, 0.674; the
    # ratio of the medians (6.8 / 9.5) pairs the point's disturbed-time reading with a quiet reference
    noisy = {"latency_ms": 6.8, "rounds_ms": [6.9, 6.8, 6.4], "reference_ms": 9.5,
             "reference_rounds_ms": [10.6, 9.5, 9.5]}
    assert meter.paired_drift_corrected(noisy, 9.5) == pytest.approx(6.4)
    assert meter.drift_corrected([6.8], [9.5], 9.5) == [pytest.approx(6.8)]
    assert meter.paired_ratio({"latency_ms": 3.0, "reference_ms": 6.0}) == 0.5  # one reading each: their ratio
    assert calibration.measure_beside is meter.measure_beside and lookup_table.drift_corrected is meter.drift_corrected


def test_measurements_taken_while_the_machine_was_disturbed_are_taken_again():
    """meter.retake_disturbed: a measurement whose reference read more than 5 % off the usual reference latency (the
    10th percentile of the run's readings at that length) is measured again at the end of the run, at most twice
    (once when the first pass settles less than half of them); the one whose reference is closest to the usual
    latency is kept, and the discarded readings are recorded."""
    def beside(lat, ref):
        return {"latency_ms": lat, "reference_ms": ref, "reference_rounds_ms": [ref]}

    results = {("a", 128): beside(5.0, 10.0), ("b", 128): beside(6.0, 10.1), ("c", 128): beside(9.0, 12.0),
               ("d", 128): beside(4.0, 9.9), ("e", 32): beside(1.0, 3.0), ("f", 32): beside(2.0, 3.6),
               ("g", 32): beside(1.5, 3.0)}
    again = {("c", 128): [beside(6.2, 10.2)], ("f", 32): [beside(2.4, 3.9), beside(2.3, 3.8)]}
    asked = []

    def measure_again(keys):
        asked.append(sorted(keys))
        return {k: again[k].pop(0) for k in keys}

    n = meter.retake_disturbed(results, measure_again, group=lambda k: k[1])
    assert asked == [[("c", 128), ("f", 32)], [("f", 32)]] and n == 3  # the first pass settled one of the two
    assert results[("c", 128)]["latency_ms"] == 6.2 and results[("c", 128)]["disturbed_ms"] == [12.0]
    assert results[("f", 32)]["latency_ms"] == 2.0 and results[("f", 32)]["disturbed_ms"] == [3.9, 3.8]  # kept
    assert results[("c", 128)]["retaken"] == 1 and results[("f", 32)]["retaken"] == 2
    assert "retaken" not in results[("a", 128)]
    # a machine busy for most of a run: the undisturbed speed is that of the few quiet readings, not the median
    assert meter.quiet_latency([10.5] * 12 + [7.7, 7.6, 7.8, 7.7]) == pytest.approx(7.7)
    mostly_busy = {i: beside(1.0, 10.5 if i < 12 else 7.7) for i in range(16)}
    calm = meter.retake_disturbed(mostly_busy, lambda keys: {k: beside(0.8, 7.8) for k in keys}, passes=1)
    assert calm == 12 and all(r["reference_ms"] < 8 for r in mostly_busy.values())
    quiet = {k: beside(1.0, 10.0) for k in "xyz"}
    assert meter.retake_disturbed(quiet, lambda keys: pytest.fail("nothing to take again")) == 0
    # a machine that stays busy: the first pass settles one of three, so there is no second
    busy = {i: beside(1.0, 10.0 if i < 5 else 11.0) for i in range(8)}
    asked.clear()
    n = meter.retake_disturbed(busy, lambda keys: asked.append(sorted(keys)) or {
        k: beside(0.9, 10.1 if k == 5 else 11.2) for k in keys})
    assert asked == [[5, 6, 7]] and n == 3 and busy[5]["reference_ms"] == 10.1 and busy[6]["retaken"] == 1


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config("bert", vocab_size=tokenizer.vocab_size, num_hidden_layers=2, max_position_embeddings=100)
    return model_from_config(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny, tokenizer, target):
    """The unpruned model and a point, exported as a compile does: the point measured beside the unpruned one."""
    from toolchain.ship.export import export_point
    from toolchain.ship.verify import Reference

    out = tmp_path_factory.mktemp("export")
    full = SubNetwork.full(2, tiny.config.num_attention_heads, tiny.config.intermediate_size)
    speed = 0.5  # "the unpruned network took 0.5 ms when the table was calibrated"
    ref = export_point(tiny, full, tokenizer, out / "unpruned", target=target, reference=Reference(None, speed),
                       lengths=(16, 64, 128), **RUNS)
    point = export_point(tiny, SubNetwork((1, 0), (8, 0)), tokenizer, out / "p0", target=target,
                         reference=Reference(ref.path / "model.onnx", speed), lengths=(16, 64, 128), **RUNS)
    return ref, point, speed


def test_a_disturbed_export_measurement_is_taken_again(exported, target, tiny):
    """A reference that reads far from the calibration's speed (here: a speed of 1000 ms, as if the machine were
    busy) has the latency taken again, once by default, keeping the measurement whose reference is the closer."""
    from toolchain.ship.verify import Reference, measure_exported, meter_settings

    ref, point, _ = exported
    settings = meter_settings(target, None, 1, 64)
    runs = {"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time_s": 0.0}
    onnx_ref = Reference(ref.path / "model.onnx", 1000.0)
    vocab = tiny.config.vocab_size
    m = measure_exported(point.path / "model.onnx", settings, vocab, reference=onnx_ref, memory=False,
                         measurement=runs)
    assert m["reference"]["retaken"] == 1 and len(m["reference"]["disturbed_ms"]) == 1
    assert m["reference"]["disturbed"] is True  # still far from 1000 ms after the retake: recorded for the gate
    assert m["reference"]["latency_ms"] >= max(m["reference"]["disturbed_ms"])  # the closer to 1000 ms is kept
    assert m["latency_drift_corrected_ms"] == pytest.approx(1000.0 * float(np.median(
        np.divide(m["latency"]["rounds_ms"], m["reference"]["rounds_ms"]))))  # the kept take's rounds, paired
    quiet = measure_exported(point.path / "model.onnx", settings, vocab, reference=onnx_ref, memory=False,
                             measurement=runs, retakes=0)
    assert "retaken" not in quiet["reference"]


def test_export_measures_beside_the_unpruned_model(exported):
    ref, point, speed = exported
    m = json.loads((point.path / "nasprune.json").read_text())["measured"]
    rounds, refs = m["latency"]["rounds_ms"], m["reference"]["rounds_ms"]
    assert len(rounds) == len(refs) == meter.E2E_ROUNDS and m["latency"]["reps"] == 3
    assert m["latency_ms"] == pytest.approx(float(np.median(rounds)))  # the raw figure stays the headline
    assert m["reference"]["latency_ms"] == pytest.approx(float(np.median(refs)))
    assert m["latency_drift_corrected_ms"] == pytest.approx(speed * float(np.median(np.divide(rounds, refs))))
    assert m["reference"]["model"] == "unpruned" and m["reference"]["speed_ms"] == speed
    assert m["memory_mb"] > 0 and m["memory"]["peak_reset"] is True
    assert m["latency"]["measured_on"]["provider"] == "CPUExecutionProvider"
    # the unpruned model is its own reference: its drift-corrected figure is the calibration's speed
    r = ref.info["measured"]
    assert r["reference"]["model"] == "itself" and r["latency_drift_corrected_ms"] == pytest.approx(speed)


def test_export_reports_latency_at_other_lengths(exported):
    """At the target's length (32) and at each asked length up to the model's positions (100: not 128)."""
    ref, point, _ = exported
    m = point.info["measured"]
    assert list(m["latency_by_length_ms"]) == ["16", "32", "64"]
    assert m["latency_by_length_ms"]["32"] == m["latency_ms"] and all(v > 0 for v in m["latency_by_length_ms"].values())
    assert list(m["reference"]["latency_by_length_ms"]) == ["16", "32", "64"]
    assert point.info["sequence_length"] == 32


def test_the_manifest_carries_the_drift_corrected_figure(exported, tmp_path):
    from toolchain.ship.manifest import write_manifest

    _, point, _ = exported
    entry = json.loads(write_manifest(tmp_path, {}, {}, None, [point]).read_text())["points"][0]
    assert entry["measured_latency_drift_corrected_ms"] == point.info["measured"]["latency_drift_corrected_ms"]


# --------------------------------------------------------------------------------------- prediction intervals
def _table(residuals=None, samples=None, speed=None) -> LatencyTable:
    t = _table_of(lambda h, u: 1.0 + h + u / 8, [0, 1], [0, 8],
                  {"latency": {"a": 1.0, "b": 0.0, "reference_ms": speed}} if speed else None)
    t.validation["latency"] = {k: v for k, v in (("residuals", residuals), ("samples", samples)) if v is not None}
    return t


def test_the_bound_is_the_conformal_quantile_of_measured_over_predicted():
    sub = SubNetwork((1, 1), (8, 0))
    res = list(np.linspace(-0.05, 0.14, 20))  # 20 ratios 0.95 .. 1.14
    t = _table(residuals=res)
    point = t.predict_latency(sub)
    for q in (0.5, 0.8, 0.9, 0.95):
        k = math.ceil((len(res) + 1) * q)
        b = t.latency_bound(q)
        assert b["n"] == 20 and b["level"] == pytest.approx(k / 20) and "note" not in b
        assert b["factor"] == pytest.approx(sorted(1 + r for r in res)[k - 1])
        assert t.predict_latency(sub, q) == pytest.approx(point * b["factor"])
    assert t.predict_latency(sub, 0.5) < t.predict_latency(sub, 0.95)
    small = _table(residuals=[0.01, 0.03, -0.02])  # too few for 0.95: the largest ratio, and it says so
    assert small.latency_bound(0.95)["factor"] == pytest.approx(1.03) and "too few" in small.latency_bound(0.95)["note"]
    with pytest.raises(ValueError, match="between 0 and 1"):
        t.latency_bound(1.5)


def test_tables_without_residuals_still_load_and_bound(caplog):
    """A table written before residuals were stored derives them from its validation samples (drift-corrected
    where they have their reference measurement); without samples the bound is the point prediction, said once."""
    sub = SubNetwork((1, 0), (8, 0))
    samples = [{"predicted": 10.0, "measured": 11.0, "reference_ms": 22.0},
               {"predicted": 10.0, "measured": 9.0, "reference_ms": 18.0}]
    derived = _table(samples=samples, speed=20.0)
    res, method = derived.latency_residuals()
    assert res == pytest.approx([0.0, 0.0]) and "unpruned latency" in method  # both at the calibration's speed
    raw = _table(samples=[{"predicted": 10.0, "measured": 11.0}])
    assert raw.latency_residuals()[0] == pytest.approx([0.1]) and "not drift-corrected" in raw.latency_residuals()[1]
    bare = _table()
    with caplog.at_level(logging.WARNING):
        assert bare.predict_latency(sub, 0.95) == bare.predict_latency(sub)
        bare.predict_latency(sub, 0.9)
    assert len([r for r in caplog.records if "no validation residuals" in r.getMessage()]) == 1
    assert bare.latency_bound(0.9)["factor"] == 1.0 and bare.latency_bound(0.9)["n"] == 0


def test_validation_stores_drift_corrected_residuals(tmp_path, target):
    """latency_models.calibration.validate: one residual per held-out sub-network, from its drift-corrected
    measurement; the saved table loads with them."""
    from latency_models.lookup_table import residuals_of
    from latency_models.profile import profile

    cfg = tiny_config(hidden_size=32, num_attention_heads=2, intermediate_size=16, num_hidden_layers=2)
    torch.manual_seed(0)
    fast = {"warmup": 1, "min_reps": 3, "min_time_s": 0.0, "max_reps": 3}
    table = profile(ModelDims.from_config(cfg), target, "fp32", tmp_path / "t.json", model_config=cfg, unit_step=8,
                    progress=False, measurement=fast, model=model_from_config(cfg).eval(), calibrate_samples=2,
                    validate_samples=3, lengths=())  # the target's length alone: nothing checked here depends on it
    v = LatencyTable.load(tmp_path / "t.json").validation["latency"]
    speed = table.calibration["latency"]["reference_ms"]
    assert len(v["residuals"]) == 3 and "unpruned latency" in v["residuals_method"]
    for r, s in zip(v["residuals"], v["samples"]):  # drift-corrected round by round (targets.meter.paired_ratio)
        assert r == pytest.approx(s["ratio_to_reference"] * speed / s["predicted"] - 1)
    # a table validated before the rounds were paired (no ratio_to_reference) reads the ratio of the medians
    old = [{k: v for k, v in s.items() if k != "ratio_to_reference"} for s in v["samples"]]
    for r, s in zip(residuals_of(old, speed)[0], old):
        assert r == pytest.approx(s["measured"] * speed / s["reference_ms"] / s["predicted"] - 1)


def test_the_search_constrains_the_bound_and_optimises_the_prediction():
    """With a confidence the latency limit holds for prediction x factor, i.e. the prediction must stay under
    limit / factor; the objective stays the prediction, the bound is recorded beside it."""
    from toolchain.pipeline import cost_metrics

    t = _table(residuals=[0.1] * 20)
    space = make_space("medium", ModelDims("bert", 2, 1, 8, 8, 8, 100, 2))
    sub = SubNetwork((1, 1), (8, 0))
    plain, sure = CompileOptions(max_latency=10.0), CompileOptions(max_latency=10.0, latency_confidence=0.9)
    assert plain.constraints(t) == {"latency": 10.0} and sure.constraints() == {"latency": 10.0}
    assert sure.constraints(t)["latency"] == pytest.approx(10.0 / 1.1)
    costs = cost_metrics(t, space, sub, confidence=0.9)
    assert costs["latency"] == t.predict_latency(sub) and costs["latency_bound"] == pytest.approx(1.1 * costs["latency"])
    assert "latency_bound" not in cost_metrics(t, space, sub)
    assert "9.09 ms" in confidence_note(0.9, 10.0, t) and confidence_note(None, 10.0, t) == ""
    with pytest.raises(CompileError, match="between 0 and 1"):
        CompileOptions(latency_confidence=95)


def test_the_search_places_a_candidate_in_its_fastest_precision():
    """With a table per precision (FastestPrecision) a candidate's latency is the fastest prediction, its memory
    that precision's; a budget only the int8 export meets admits it; a confidence bound is the widest of the
    tables' (so it holds whichever precision ships)."""
    from latency_models.precisions import FastestPrecision
    from toolchain.pipeline import cost_metrics
    from toolchain.search.objectives import feasibility

    fp32 = _table(residuals=[0.02] * 20)
    int8 = _table_of(lambda h, u: 0.4 + 0.4 * h + u / 32, [0, 1], [0, 8])  # blocks 2-3x faster, a larger base
    int8.data["base"] = {"latency_ms": 3.0, "memory_mb": 12.0, "weights_mb": 3.0}
    int8.validation["latency"] = {"residuals": [0.08] * 20}
    both = FastestPrecision({"fp32": fp32, "int8": int8})
    space = make_space("medium", ModelDims("bert", 2, 1, 8, 8, 8, 100, 2))
    big, empty = SubNetwork((1, 1), (8, 8)), SubNetwork((0, 0), (0, 0))
    assert int8.predict_latency(big) < fp32.predict_latency(big) and both.precision_of(big) == "int8"
    assert fp32.predict_latency(empty) < int8.predict_latency(empty) and both.precision_of(empty) == "fp32"
    for sub in (big, empty):
        p = both.precision_of(sub)
        costs = cost_metrics(both, space, sub)
        assert costs["latency"] == min(fp32.predict_latency(sub), int8.predict_latency(sub))
        assert costs["memory"] == both.tables[p].predict_memory(sub)
    budget = (fp32.predict_latency(big) + int8.predict_latency(big)) / 2  # int8 only
    limit = CompileOptions(max_latency=budget).constraints(both)
    assert not feasibility(cost_metrics(fp32, space, big), limit)["feasible"]
    assert feasibility(cost_metrics(both, space, big), limit)["feasible"]
    bound = both.latency_bound(0.9)
    assert bound["precision"] == "int8" and bound["factor"] == pytest.approx(1.08)
    assert bound["by_precision"] == {"fp32": pytest.approx(1.02), "int8": pytest.approx(1.08)}
    assert CompileOptions(max_latency=10.0, latency_confidence=0.9).constraints(both)["latency"] == pytest.approx(
        10.0 / 1.08)
    # with one table (--precision, or a table of another device) it reads as that table
    one = FastestPrecision({"fp32": fp32})
    assert one.latency_bound(0.9) == fp32.latency_bound(0.9) and one.describe() == "fp32"
    assert cost_metrics(one, space, big, confidence=0.9) == cost_metrics(fp32, space, big, confidence=0.9)
    assert both.describe() == "the fastest of fp32, int8"


# -------------------------------------------------------------------------------------------- sequence length
def test_sequence_length_values():
    assert parse_sequence_length(None) is None and parse_sequence_length("DATA") == "data"
    assert parse_sequence_length("48") == 48 and parse_sequence_length(64) == 64
    for bad in ("0", "-8", "long", "4.5"):
        with pytest.raises(TargetError, match="--sequence-length"):
            parse_sequence_length(bad)


def _custom_data(tmp_path, texts, max_length=128) -> DataSettings:
    lines = ["sentence,label"] + [f'"{t}",{i % 2}' for i, t in enumerate(texts)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(lines[:5]) + "\n")
    return DataSettings(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv"),
                        max_length=max_length)


def test_data_length_is_a_quantile_of_the_tokenized_training_texts(tmp_path, tiny_model_dir, tokenizer):
    texts = [" ".join(["word"] * n) for n in range(1, 41)]  # 1 .. 40 words: 3 .. 42 tokens with [CLS] / [SEP]
    data = _custom_data(tmp_path, texts)
    lengths = sorted(len(tokenizer(t)["input_ids"]) for t in texts)
    n, why = data_sequence_length(data, str(tiny_model_dir), 0.95)
    tokens = int(np.quantile(lengths, 0.95, method="higher"))
    assert n == 8 * math.ceil(tokens / 8) and n % 8 == 0 and n >= tokens
    assert why == f"p95 of 40 {data.train_file} training examples: {tokens} tokens -> {n}"
    assert data_sequence_length(data, str(tiny_model_dir), 0.5)[0] < n
    capped = _custom_data(tmp_path, texts, max_length=20)
    n, why = data_sequence_length(capped, str(tiny_model_dir), 0.95)
    assert n == 20 and "capped at --max-length 20" in why


def test_the_target_takes_the_length_and_so_does_its_table(tmp_path, tiny_model_dir, target, capsys):
    """The target at the asked length: another fingerprint, so another cached table; a run's later stage commands
    use the length it was compiled at."""
    texts = [" ".join(["word"] * n) for n in range(1, 41)]
    opts = CompileOptions(model=str(tiny_model_dir), data=_custom_data(tmp_path, texts), target=str(target.source),
                          sequence_length="data")
    at = opts.resolved_target()
    assert at.sequence_length == data_sequence_length(opts.data, str(tiny_model_dir))[0] != target.sequence_length
    assert f"sequence length {at.sequence_length}: p95 of 40" in capsys.readouterr().out
    assert at.fingerprint("fp32")["sequence_length"] == at.sequence_length
    dims = ModelDims.from_config(tiny_config())
    assert default_table_path(at, "fp32", dims) != default_table_path(target, "fp32", dims)
    assert CompileOptions(target=str(target.source), sequence_length=48).resolved_target().sequence_length == 48
    assert at_length(target, None) is target

    class Run:  # what for_run reads of a compiled run folder
        settings = {"compile": {"sequence_length": 24, "sequence_length_from": "--sequence-length 24"}}
        data = opts.data

    assert CompileOptions(target=str(target.source)).for_run(Run).resolved_target().sequence_length == 24
    assert CompileOptions(sequence_length=40).for_run(Run).sequence_length == 40
    Run.settings = {"compile": {"sequence_length": 128, "sequence_length_from": None}}  # compiled at the target's
    assert CompileOptions(target=str(target.source)).for_run(Run).resolved_target().sequence_length == 32


def test_drift_correction_needs_the_table_of_this_target(target):
    """export_reference: the calibration's speed where the table was measured here under the same conditions."""
    t = _table(speed=12.0)
    t.data["fingerprint"] = target.fingerprint("fp32")
    assert export_reference(t, target).speed_ms == 12.0 and export_reference(t, target).onnx is None
    assert export_reference(t, at_length(target, 64)).speed_ms is None  # another length
    assert export_reference(t, target.on_device({"cpu_model": "elsewhere"})).speed_ms is None
    assert export_reference(_table(), target).speed_ms is None  # an uncalibrated table


def test_each_precision_is_measured_beside_the_unpruned_network_in_it(target, tiny, exported):
    """References: an int8 export is measured beside the unpruned network in int8, drift-corrected to the int8
    table's calibration speed; the base precision's exports beside the exported reference; the int8 graph is built
    once and removed with the context."""
    from toolchain.ship.verify import Reference, measure_exported, meter_settings

    ref = exported[0]
    fp32, int8 = _table(speed=12.0), _table(speed=5.0)
    fp32.data["fingerprint"], int8.data["fingerprint"] = target.fingerprint("fp32"), target.fingerprint("int8")
    base = Reference(ref.path / "model.onnx", 12.0)
    with References("fp32", {"fp32": fp32, "int8": int8}, target, tiny) as refs:
        assert refs(None, base) is base and refs("fp32", base) is base
        own = refs("int8", base)
        assert own is refs("int8", base) and own.onnx.is_file() and own.speed_ms == 5.0
        assert own.name == "unpruned (int8)"
        assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(own.onnx)).graph.node}
        runs = {"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time_s": 0.0}
        m = measure_exported(own.onnx, meter_settings(target, None, 1, 32), tiny.config.vocab_size, reference=own,
                             memory=False, measurement=runs, retakes=0)
        assert m["reference"]["model"] == "unpruned (int8)" and m["reference"]["speed_ms"] == 5.0
    assert not own.onnx.exists()
    with References("fp32", {"fp32": fp32}, target, tiny) as refs:  # no int8 table: no frame of its own
        assert refs("int8", base) is base


def test_an_export_is_kept_and_reused_with_its_latency_measured_again(tmp_path, target, tiny, tokenizer, exported):
    """export_cache: the first call builds and keeps the export; the same key copies it into the run with its
    metric and verification, measuring its latency at the target's length again beside the reference; another
    precision, target or scoring data is another key."""
    from toolchain.ship.export import export_point
    from toolchain.ship.export_cache import export_key, reuse_or_export
    from toolchain.ship.verify import MetricData, Reference

    ref = exported[0]
    beside = Reference(ref.path / "model.onnx", 0.5)
    rows = np.random.default_rng(0).integers(5, 100, size=(6, 32))
    data = MetricData({"input_ids": rows, "attention_mask": np.ones_like(rows)}, np.array([0, 1] * 3),
                      lambda p, y: {"score": float((p.argmax(-1) == y).mean())})
    key = export_key("fp32", target, data, (16,))
    assert key == export_key("fp32", target, data, (16,))
    assert len({key, export_key("int8", target, data, (16,)), export_key("fp32", at_length(target, 64), data, (16,)),
                export_key("fp32", target, replace(data, labels=np.array([1, 0] * 3)), (16,))}) == 4
    sub = SubNetwork((1, 0), (8, 0))
    kw = dict(point_id="p", predicted={"latency_ms": 0.4}, extra={"note": 1}, target=target, reference=beside)
    made = []

    def build(out):
        made.append(out)
        return export_point(tiny, sub, tokenizer, out, target=target, reference=beside, metric_data=data,
                            lengths=(16,), point_id="p", predicted={"latency_ms": 0.4}, extra={"note": 1}, **RUNS)

    store = tmp_path / "exports"
    store.mkdir()
    first = reuse_or_export(store, key, tmp_path / "run1" / "p", lambda: build(tmp_path / "run1" / "p"), **kw)
    assert made and (store / key / "model.onnx").is_file() and "reused" not in first.info
    again = reuse_or_export(store, key, tmp_path / "run2" / "q", lambda: build(tmp_path / "never"),
                            **{**kw, "point_id": "q", "extra": {"note": 2}})
    assert len(made) == 1 and not (tmp_path / "never").exists()
    info = json.loads((tmp_path / "run2" / "q" / "nasprune.json").read_text())
    assert info == again.info and info["id"] == "q" and info["extra"] == {"note": 2} and info["reused"]["export"]
    assert info["metric"] == first.info["metric"] and info["verification"] == first.info["verification"]
    m, m0 = info["measured"], first.info["measured"]
    assert m["memory_mb"] == m0["memory_mb"] and m["latency_by_length_ms"]["16"] == m0["latency_by_length_ms"]["16"]
    assert m["latency_by_length_ms"]["32"] == m["latency_ms"] and m["reference"]["speed_ms"] == 0.5
    assert len(m["latency"]["rounds_ms"]) == len(m["reference"]["rounds_ms"]) == beside.rounds
    assert (tmp_path / "run1" / "p" / "model.onnx").read_bytes() == (tmp_path / "run2" / "q" / "model.onnx").read_bytes()


def test_a_candidate_is_out_of_reach_only_beyond_every_error_its_table_made():
    """out_of_reach: over the budget even at the smallest measured / predicted ratio of the table's validation, less
    UNREACHABLE_MARGIN; never without a budget, a prediction or residuals."""
    from toolchain.ship.selection import UNREACHABLE_MARGIN, out_of_reach

    t = _table(residuals=[-0.10, 0.0, 0.05])  # once measured 10 % under its prediction
    edge = 3.0 / (0.90 * (1 - UNREACHABLE_MARGIN))  # the prediction whose best case is exactly the budget
    assert out_of_reach(edge * 0.999, t, 3.0) is None
    why = out_of_reach(edge * 1.001, t, 3.0)
    assert why and "0.900" in why and "max 3 ms" in why
    assert out_of_reach(100.0, t, None) is None and out_of_reach(None, t, 3.0) is None
    assert out_of_reach(100.0, None, 3.0) is None and out_of_reach(100.0, _table(), 3.0) is None


def test_profile_cli_at_a_length(tmp_path, monkeypatch, tiny_model_dir):
    """``nasprune profile --sequence-length 24``: the table's fingerprint says 24 (a bundle: nothing measured)."""
    from toolchain.cli import main

    bundle = tmp_path / "bundle"
    assert main(["profile", "--model", str(tiny_model_dir), "--sequence-length", "24", "--bundle", str(bundle),
                 "--unit-step", "64", "--calibrate-samples", "2", "--validate-samples", "2"]) == 0
    assert json.loads((bundle / "manifest.json").read_text())["target"]["sequence_length"] == 24


# ------------------------------------------------------------------------------------------------- one compile
@pytest.mark.slow  # about 1.5 minutes alone on 2 busy cores: the target's table, over lengths, calibrated and validated
def test_a_compile_at_the_data_length_with_a_confidence(env, tiny_model_dir, capsys):
    """``--sequence-length data --latency-confidence 0.9``: the length is printed with its reason, the target's table
    (covering several lengths) is read at it, the search's limit is on the bound, every exported point is measured at it, beside the unpruned
    model, and at the other lengths."""
    from conftest import QUICK_CPU
    from toolchain.cli import compile_main

    fast = ["--target", str(QUICK_CPU), "--preset", "quick", "--calibrate-samples", "3", "--validate-samples", "3",
            "--max-train-samples", "64", "--search-eval-samples", "32", "--method", "rfp", "--rfp-samples", "32",
            "--export", "1", "--max-latency", "50ms"]
    assert compile_main(["--model", str(tiny_model_dir), *fast, "--sequence-length", "data", "--latency-confidence",
                         "0.9", "-o", "out"]) == 0
    settings = json.loads(Path("out/manifest.json").read_text())["settings"]
    n = settings["sequence_length"]
    assert f"sequence length {n}: p95 of 64 sst2 training examples: " in capsys.readouterr().out and n % 8 == 0
    assert settings["sequence_length_from"].startswith("p95 of 64 sst2") and settings["latency_confidence"] == 0.9
    table = LatencyTable.load(settings["latency_table"]).at_length(n)  # the target's own table, read at n
    assert table.fingerprint["sequence_length"] == n and len(table.latency_residuals()[0]) > 0
    # the search placed candidates in their fastest precision: the bound is the widest of the tables' (one per
    # precision, each read at n), the search's limit on the prediction is the budget over it
    from latency_models.precisions import FastestPrecision

    tables = {p: LatencyTable.load(path).at_length(n) for p, path in settings["search_latency_tables"].items()}
    assert set(tables) == {"fp32", "int8"} and tables["int8"].fingerprint["sequence_length"] == n
    bound = settings["latency_bound"]
    assert bound == FastestPrecision(tables).latency_bound(0.9)
    assert bound["by_precision"]["fp32"] == table.latency_bound(0.9)["factor"]
    pareto = json.loads(Path("out/pareto.json").read_text())
    assert pareto["constraints"]["latency"] == pytest.approx(50.0 / bound["factor"])
    for folder in [Path("out/reference/unpruned"), *Path("out").glob("points/*"), *Path("out").glob("rejected/*")]:
        info = json.loads((folder / "nasprune.json").read_text())
        m = info["measured"]
        assert info["sequence_length"] == n and str(n) in m["latency_by_length_ms"] and "16" in m["latency_by_length_ms"]
        assert len(m["reference"]["rounds_ms"]) == meter.E2E_ROUNDS and m["latency_drift_corrected_ms"] > 0
    manifest = json.loads(Path("out/manifest.json").read_text())
    assert all("16" in p["measured_latency_by_length_ms"] for p in manifest["points"])
    assert "measured at other lengths" in Path("out/report.html").read_text()


# --------------------------------------------------------------------------------------- tables over lengths
def _additive_results(manifest) -> dict:
    """A measurement of every graph of ``manifest`` from an additive cost at each length ``n``: the zero-layer
    graph ``B(n)``, a layer ``g(n) + a(n) * heads + f(n) * units`` (latency; memory alike, other numbers)."""
    def cost(entry, scale):
        n = entry.get("length", manifest["target"]["sequence_length"])
        base = scale * (1.0 + n / 64)
        if not entry["layers"]:
            return base
        return base + scale * (0.2 + 0.01 * n + (0.05 + n / 1000) * entry["heads"] + (0.003 + n / 9000) * entry["units"])

    return {e["key"]: {"latency_ms": cost(e, 1.0), "memory_mb": cost(e, 3.0), "reps": 5, "weight_bytes": 0}
            for e in manifest["graphs"]}


def _block(n, h, u, scale=1.0):
    return 0.0 if h == u == 0 else scale * (0.2 + 0.01 * n + (0.05 + n / 1000) * h + (0.003 + n / 9000) * u)


def test_the_cross_measured_at_each_length_gives_every_block_there(target):
    """make_manifest measures the cross of the grid at every length; for costs additive in attention and FFN,
    the table's blocks at every length (the own one too) come out exact -- latency and working memory."""
    from latency_models.assemble import assemble_table
    from latency_models.grid import make_manifest

    dims = ModelDims.from_config(tiny_config(num_attention_heads=2, intermediate_size=16))
    manifest = make_manifest(dims, target, "fp32", 8, None, [16, 32, 64])
    assert manifest["lengths"] == [16, 32, 64]
    measured_at = {e["length"] for e in manifest["graphs"] if "length" in e}
    # at the own length too, only the cross: base, 2 head counts, 2 unit counts, 2 diagonal cells
    assert measured_at == {16, 64} and len([e for e in manifest["graphs"] if "length" not in e]) == 7
    table = LatencyTable(assemble_table(manifest, _additive_results(manifest), target.fingerprint("fp32")))
    assert table.lengths() == [16, 32, 64]
    for n in (16, 32, 64):
        at = table.at_length(n)
        assert at.fingerprint["sequence_length"] == n and at.data["base"]["latency_ms"] == pytest.approx(1 + n / 64)
        for h in (0, 1, 2):
            for u in (0, 8, 16):
                assert at.data["blocks"]["latency_ms"][h][u // 8] == pytest.approx(_block(n, h, u), abs=1e-9)
                # working memory = memory - weights (0 here), at scale 3
                assert at.data["blocks"]["working_mb"][h][u // 8] == pytest.approx(_block(n, h, u, 3.0), abs=1e-9)


def test_between_two_lengths_predictions_are_interpolated(target, tmp_path):
    from latency_models.assemble import assemble_table
    from latency_models.grid import make_manifest
    from latency_models.lookup_table import TableError

    dims = ModelDims.from_config(tiny_config(num_attention_heads=2, intermediate_size=16))
    manifest = make_manifest(dims, target, "fp32", 8, None, [16, 32, 64])
    table = LatencyTable(assemble_table(manifest, _additive_results(manifest), target.fingerprint("fp32")),
                         tmp_path / "t.json")
    sub = SubNetwork((2, 1, 0), (16, 0, 8))
    p16, p32, p64 = (table.at_length(n).predict_latency(sub) for n in (16, 32, 64))
    assert p16 < p32 < p64
    assert table.at_length(24).predict_latency(sub) == pytest.approx((p16 + p32) / 2)
    assert table.at_length(56).predict_latency(sub) == pytest.approx(0.25 * p32 + 0.75 * p64)
    assert table.at_length(32) is table and table.covers(40) and not table.covers(65)
    with pytest.raises(TableError, match="covers sequence lengths 16 to 64, not 100"):
        table.at_length(100)
    table.at_length(64).calibration["latency"] = {"a": 2.0, "b": 0.0, "n": 9}  # a view shares its length's part
    assert table.data["lengths"]["at"]["64"]["calibration"]["latency"]["a"] == 2.0
    table.at_length(16).save()  # a view saves the whole table
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.lengths() == [16, 32, 64] and again.at_length(64).predict_latency(sub) == pytest.approx(2 * p64)


def test_a_length_within_the_table_reads_the_targets_own_table(tmp_path, monkeypatch, target, tiny_model_dir,
                                                               caplog):
    """``--sequence-length 48`` on a target profiled at 32 (covering 16 to 64): the target's own cached table, read
    at 48, no new profile; 100 (beyond it) would need a table of its own."""
    from latency_models.profile import profile
    from toolchain.tables import latency_table_for

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path))
    cfg = tiny_config(num_attention_heads=2, intermediate_size=16, max_position_embeddings=80)
    dims = ModelDims.from_config(cfg)
    own = default_table_path(target, "fp32", dims)
    fast = {"warmup": 1, "min_reps": 3, "min_time_s": 0.01, "max_reps": 50}
    made = profile(dims, target, "fp32", own, model_config=cfg, unit_step=8, progress=False, measurement=fast,
                   calibrate_samples=3, validate_samples=2, length_validation=1)
    # every calibration sample at every length; of the validation samples, the first length_validation
    assert made.lengths() == [16, 32, 64] and made.at_length(64).validation["latency"]["n"] == 1
    assert made.validation["latency"]["n"] == 2
    assert made.at_length(16).calibration["latency"]["n"] == 4  # 3 samples + the unpruned network
    opts = CompileOptions(target=str(target.source), sequence_length=48, calibration_samples=7)
    at48 = opts.resolved_target()
    with caplog.at_level(logging.WARNING, logger="toolchain.tables"):
        table = latency_table_for(opts, at48, "fp32", dims, cfg)
    # --calibrate-samples does not apply to a cached table: the compile says so, and what the table rests on
    assert f"--calibrate-samples: only for a latency table this compile profiles; the cached table {own}" in \
        caplog.text and "calibrated on 4 end-to-end measurements (the unpruned network's included), validated on 2" \
        in caplog.text
    assert table.sequence_length == 48 and table.path == own and table.validation["interpolated"] == [32, 64]
    assert not default_table_path(at48, "fp32", dims).exists()  # nothing profiled at 48
    assert len(table.latency_residuals()[0]) == 3  # both neighbours' validation residuals (32: 2, 64: 1)
