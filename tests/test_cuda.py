"""CUDA targets (``targets/cuda.toml``, fp32 / fp16): on a machine with onnxruntime-gpu and a GPU, export,
verification, measurement and profiling run on CUDA; elsewhere every entry point says so in one clear line.

Each half skips, with its reason, on the other kind of machine; the checks of the fp16 graph and of the silent CPU
fall-back run everywhere.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from targets import ProviderUnavailableError, load_target
from targets.session import check_started
from toolchain.core.modeling import model_from_config, tiny_config
from toolchain.core.subnetwork import SubNetwork
from toolchain.ship.verify import FP32_GPU_TOLERANCE


def _cuda_unavailable() -> str | None:
    try:
        load_target("cuda").check_available()
    except ProviderUnavailableError as e:
        return str(e)
    return None


WHY_NOT = _cuda_unavailable()
needs_cuda = pytest.mark.skipif(WHY_NOT is not None, reason=f"CUDA is not available here: {(WHY_NOT or '')[:160]}")
without_cuda = pytest.mark.skipif(WHY_NOT is None, reason="CUDA is available here (the no-CUDA messages are not "
                                                          "reachable)")
FAST = {"warmup": 2, "min_reps": 5, "min_time_s": 0.02, "max_reps": 50}


def _model(tokenizer):
    torch.manual_seed(0)
    return model_from_config(tiny_config("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=140)).eval()


def _metric_data():
    from toolchain.ship.verify import MetricData

    def data(tokenizer):
        texts = ["great fun", "a dull, lifeless and far too long movie", "fine", "I loved every minute of it", "meh"]
        enc = tokenizer(texts, padding=True, return_tensors="np")
        return MetricData(dict(enc), np.array([1, 0, 1, 1, 0]),
                          lambda p, y: {"score": float(np.mean(p.argmax(1) == y))}, name="accuracy")

    return data


# ------------------------------------------------------------------------------------------------ everywhere
class _Session:
    def __init__(self, providers):
        self._p = providers

    def get_providers(self):
        return self._p


def test_a_silent_cpu_fallback_is_refused():
    """onnxruntime-gpu without a usable GPU opens the session on the CPU: that must not be measured as CUDA."""
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*could not start"):
        check_started(_Session(["CPUExecutionProvider"]), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_started(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"]),
                  ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_started(_Session(["CPUExecutionProvider"]), ["CPUExecutionProvider"])


def test_fp16_export_is_a_half_precision_graph_with_the_same_interface(tmp_path, tokenizer):
    import onnx

    from toolchain.onnx.build import build_onnx
    from toolchain.core.slicing import slice_model

    sliced = slice_model(_model(tokenizer), SubNetwork((4, 2, 0), (48, 16, 8)))
    build_onnx(sliced, tmp_path / "m.onnx", "fp16", 1, 32, use_gpu=True)
    m = onnx.load(str(tmp_path / "m.onnx"))
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer}
    assert "FLOAT16" in kinds
    io = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*m.graph.input,
                                                                                         *m.graph.output)}
    assert io["input_ids"] == "INT64" and io["logits"] == "FLOAT"  # keep_io_types: callers feed and get fp32
    assert sum(n.op_type == "Attention" for n in m.graph.node) == 2  # one per layer that keeps heads


# ------------------------------------------------------------------------------------------------ no CUDA
@without_cuda
def test_profile_cuda_without_cuda_is_one_clear_line(capsys):
    from toolchain.cli import profile_main

    rc = profile_main(["--target", "cuda", "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert "CUDAExecutionProvider" in err and ("nasprune[gpu]" in err or "could not start" in err)


@without_cuda
def test_compile_for_cuda_without_cuda_stops_before_training(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from toolchain.cli import compile_main

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    t = time.time()
    rc = compile_main(["--model", str(tiny_model_dir), "--target", "cuda", "--precision", "fp16", "-o",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "CUDAExecutionProvider" in err and len(err.splitlines()) == 1
    assert time.time() - t < 30 and not (tmp_path / "cache" / "supernets").exists()


@without_cuda
def test_export_for_cuda_without_cuda_leaves_nothing(tmp_path, tokenizer):
    from toolchain.ship.export import export_point

    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        export_point(_model(tokenizer), SubNetwork((4, 2, 1), (8, 8, 8)), tokenizer, tmp_path / "p",
                     target=load_target("cuda"), precision="fp16")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ with CUDA
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_export_verify_and_measure_on_cuda(tmp_path, tokenizer, precision):
    from toolchain.ship.export import export_point

    res = export_point(_model(tokenizer), SubNetwork((4, 2, 0), (48, 16, 8)), tokenizer, tmp_path / precision,
                       target=load_target("cuda"), precision=precision, metric_data=_metric_data()(tokenizer),
                       reps=10, warmup=2)
    info = res.info
    assert info["measured"]["providers"][0] == "CUDAExecutionProvider"
    assert info["measured"]["latency_ms"] > 0 and info["precision"] == precision
    assert info["onnx"]["attention_fused_ok"]
    v = info["verification"]
    assert v["passed"] and v["enforced"] == (precision == "fp32")
    assert v["max_abs_logit_delta"] < (FP32_GPU_TOLERANCE if precision == "fp32" else 2e-2)
    if precision == "fp16":
        assert abs(v["metric_delta"]) <= 0.2  # 5 sentences: one flipped label at most
    assert info["metric"]["num_examples"] == 5


@needs_cuda
def test_profile_on_cuda(tmp_path):
    from latency_models.profile import profile
    from toolchain.core.modeling import ModelDims

    cfg = tiny_config(hidden_size=32, num_attention_heads=2, intermediate_size=16, num_hidden_layers=3,
                      max_position_embeddings=140)  # the cuda target's sequence is 128 tokens
    table = profile(ModelDims.from_config(cfg), "cuda", "fp16", tmp_path / "cuda.json", model_config=cfg,
                    unit_step=8, progress=False, measurement=FAST, calibrate_samples=2, validate_samples=2)
    assert table.fingerprint["provider"] == "CUDAExecutionProvider" and table.precision == "fp16"
    assert table.predict_latency(SubNetwork((2, 1, 0), (16, 8, 0))) > 0
