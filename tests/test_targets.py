"""Targets: built-in and user TOML files, validation errors, sessions, fingerprints."""

from __future__ import annotations

import pytest

from targets import (PRECISIONS, ProviderUnavailableError, Target, TargetError, fingerprint_key, list_targets,
                     load_target, physical_cores)

GOOD = """
name = "mine"
providers = ["CPUExecutionProvider"]
batch_size = 1
sequence_length = 64
precisions = ["int8", "fp32"]
intra_op_threads = 1
graph_optimization_level = "extended"
"""


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def identity_onnx(tmp_path_factory):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return _save_graph([helper.make_node("Identity", ["x"], ["y"])], [x], [y],
                       tmp_path_factory.mktemp("onnx") / "id.onnx")


def _save_graph(nodes, inputs, outputs, path):
    import onnx
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_builtin_targets_load():
    assert {"cpu", "cuda", "arm64"} <= set(list_targets())
    cpu = load_target("cpu")
    assert cpu.providers == ("CPUExecutionProvider",)
    assert cpu.intra_op_threads == "auto" and cpu.threads == physical_cores() >= 1
    assert (cpu.batch_size, cpu.sequence_length) == (1, 128)
    assert cpu.default_precision == "fp32" and "int8" in cpu.precisions
    cuda = load_target("cuda")
    assert cuda.providers[0] == "CUDAExecutionProvider" and set(cuda.precisions) == {"fp32", "fp16"}
    arm = load_target("arm64")
    assert arm.threads == 4 and "XnnpackExecutionProvider" in arm.optional_providers
    for name in list_targets():
        t = load_target(name)
        assert set(t.precisions) <= set(PRECISIONS)


def test_user_toml(tmp_path):
    t = load_target(write(tmp_path, GOOD))
    assert isinstance(t, Target)
    assert t.name == "mine" and t.sequence_length == 64 and t.threads == 1
    assert t.default_precision == "int8" and t.graph_optimization_level == "extended"
    assert t.check_precision(None) == "int8"
    with pytest.raises(TargetError, match="fp16"):
        t.check_precision("fp16")


@pytest.mark.parametrize("bad, field", [
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\ncolour = "red"\n', "colour"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nbatch_size = "one"\n', "batch_size"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nintra_op_threads = 0\n', "intra_op_threads"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nintra_op_threads = "many"\n', "intra_op_threads"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nprecisions = ["fp8"]\n', "precisions"),
    ('name = "x"\nproviders = ["QuantumExecutionProvider"]\n', "providers"),
    ('name = "x"\nproviders = "CPUExecutionProvider"\n', "providers"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\ngraph_optimization_level = "max"\n', "graph_optimization_level"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nsequence_length = 0\n', "sequence_length"),
    ('providers = ["CPUExecutionProvider"]\n', "name"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nbatch_size = true\n', "batch_size"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\nmeasurement = 3\n', "measurement"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\n[measurement]\nreps = 5\n', "measurement"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\n[measurement]\nmin_time_s = -0.1\n', "measurement.min_time_s"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\n[measurement]\nwarmup = 1.5\n', "measurement.warmup"),
    ('name = "x"\nproviders = ["CPUExecutionProvider"]\n[measurement]\nmin_reps = 50\nmax_reps = 10\n', "max_reps"),
])
def test_validation_errors_name_file_and_field(tmp_path, bad, field):
    p = write(tmp_path, bad)
    with pytest.raises(TargetError) as e:
        load_target(p)
    assert str(p) in str(e.value) and field in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TargetError, match="not found"):
        load_target(tmp_path / "nope.toml")
    with pytest.raises(TargetError, match="unknown target 'nosuchdevice'"):
        load_target("nosuchdevice")
    p = write(tmp_path, "name = [unclosed\n")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(p)


def test_session_cpu_and_optional_xnnpack(identity_onnx):
    import numpy as np

    sess = load_target("cpu").session(identity_onnx)
    assert sess.get_providers()[-1] == "CPUExecutionProvider"
    out = sess.run(None, {"x": np.ones((1, 4), np.float32)})[0]
    assert out.shape == (1, 4)
    sess = load_target("arm64").session(identity_onnx)  # XNNPACK only where the build has it
    assert "CPUExecutionProvider" in sess.get_providers()


def test_session_unavailable_provider_is_clear(identity_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*not available"):
        load_target("cuda").session(identity_onnx)


def test_fingerprint_and_key(tmp_path):
    import onnxruntime as ort

    cpu = load_target("cpu")
    fp = cpu.fingerprint("int8")
    for k in ("cpu_model", "physical_cores", "threads", "onnxruntime", "provider", "precision", "batch_size",
              "sequence_length"):
        assert k in fp
    assert fp["onnxruntime"] == ort.__version__ and fp["precision"] == "int8" and fp["threads"] == cpu.threads
    key = fingerprint_key(fp)
    assert len(key) == 12 and key == fingerprint_key(cpu.fingerprint("int8"))
    assert key != fingerprint_key(cpu.fingerprint("fp32"))
    assert cpu.fingerprint()["precision"] == "fp32"
    with pytest.raises(TargetError):
        cpu.fingerprint("fp16")


@pytest.fixture(scope="module")
def token_onnx(tmp_path_factory):
    """A graph with a transformer's inputs (int64 input_ids / attention_mask [batch, seq]) and a float output."""
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
             helper.make_node("Cast", ["m"], ["logits"], to=TensorProto.FLOAT)]
    return _save_graph(nodes, ins, [out], tmp_path_factory.mktemp("onnx") / "tokens.onnx")


def test_meter_statistic_and_memory_unit(token_onnx):
    """targets.meter: the median of the timed runs after warm-up, order statistics beside it; memory in MB = 10^6
    bytes, peak RSS while serving minus RSS before the session, in a forked child or a fresh interpreter."""
    from targets import meter

    t = load_target("cpu")
    sess = t.session(token_onnx)
    feed = meter.make_feed([i.name for i in sess.get_inputs()], 2, 16, 100)
    assert feed["input_ids"].shape == (2, 16) and feed["input_ids"].max() < 100 and feed["attention_mask"].all()
    lat = meter.time_session(sess, feed, warmup=1, min_reps=7, min_time_s=0.0, max_reps=7)
    assert lat["reps"] == 7 and lat["warmup"] == 1
    assert lat["min_ms"] <= lat["q25_ms"] <= lat["latency_ms"] <= lat["q75_ms"] <= lat["p90_ms"] <= lat["max_ms"]
    settings = dict(t.settings(), intra_op_threads=1, sequence_length=16)
    fast = {"warmup": 1, "min_reps": 3, "min_time_s": 0.0, "max_reps": 3}
    forked = meter.measure(token_onnx, settings, 100, fast)
    isolated = meter.measure_isolated(token_onnx, settings, 100, fast)
    assert set(isolated) == set(forked) >= {"latency_ms", "memory_mb", "loaded_mb", "baseline_rss_mb", "peak_rss_mb"}
    for r in (forked, isolated):
        assert r["reps"] == 3 and r["memory_mb"] >= 0
        assert r["memory_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"])
        assert 1 < r["baseline_rss_mb"] < 10_000  # a Python process with onnxruntime loaded, in units of 10^6 bytes
    with pytest.raises(RuntimeError, match="failed"):
        meter.measure(token_onnx.parent / "missing.onnx", settings, 100, fast)


def test_a_targets_measurement_table_sets_every_measurement_of_it(tmp_path, token_onnx):
    """``[measurement]`` in a target's TOML: what the meter times for that target (unless a caller asks for more),
    what a profile's manifest records, and what a bundle carries in the target's settings."""
    from latency_models.grid import make_manifest
    from targets import meter
    from toolchain.core.modeling import ModelDims, tiny_config

    t = load_target(write(tmp_path, 'name = "x"\nproviders = ["CPUExecutionProvider"]\nintra_op_threads = 1\n'
                                    'sequence_length = 16\n[measurement]\nwarmup = 2\nmin_reps = 4\nmax_reps = 4\n'
                                    'min_time_s = 0.0\n'))
    assert t.measurement_settings == {"warmup": 2, "min_reps": 4, "max_reps": 4, "min_time_s": 0.0}
    assert t.settings()["measurement"] == t.measurement_settings and hash(t)
    assert "measurement" not in load_target("cpu").settings()  # the built-in targets keep the defaults
    r = meter.measure(token_onnx, t.settings(), 100)
    assert r["reps"] == 4 and r["warmup"] == 2
    assert meter.measure(token_onnx, t.settings(), 100, {"min_reps": 6, "max_reps": 6})["reps"] == 6
    manifest = make_manifest(ModelDims.from_config(tiny_config("bert")), t, "fp32")
    assert manifest["measurement"] == {**meter.DEFAULT_MEASUREMENT, **t.measurement_settings}
    assert manifest["target"]["measurement"] == t.measurement_settings


def test_meter_reads_gpu_memory_with_nvidia_ml_py(monkeypatch):
    """On a GPU provider the meter adds the device's memory in use (nvidia-ml-py); without it, nothing."""
    import sys
    import types

    from targets import meter

    used = {("gpu", 1): 123_000_000}
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
                                 nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used.get(h, 0)))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert meter.gpu_memory_used() == 123_000_000  # the first visible device
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert meter.gpu_memory_used() is None
