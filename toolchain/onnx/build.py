"""Torch -> ONNX -> ONNX Runtime graph optimization (fusion) -> optional int8 dynamic quantization.

Uses ``torch.onnx.export`` (TorchScript exporter: its graphs are the ones ``onnxruntime.transformers.optimizer``
pattern-matches into ``Attention`` / ``EmbedLayerNormalization`` / ``SkipLayerNormalization`` / ``BiasGelu``) and
ONNX Runtime's own optimizer and quantizer. See docs/decisions.md for why not Optimum.

On a CPU the residual connections stay ``Sum`` + ``LayerNormalization`` instead of ``SkipLayerNormalization``
(:data:`CPU_GRAPHS`, :func:`residual_sums`): ONNX Runtime's CPU kernel of that operator sums each row one element
after the other, far slower than ``LayerNormalization`` with the add beside it, a cost pruning does not shrink (the
hidden size stays): ``benchmarks/bench_graph_form.py`` measures both forms, 0.8-1.2 ms apart per model at 128
tokens.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OPSET = 17
#: the form of the graphs :func:`build_onnx` emits, per device kind; a latency table records the form it was profiled
#: on (its measurements hold for that form only)
GPU_GRAPHS = "fused"  # ``SkipLayerNormalization`` (its CUDA kernel is fast)
CPU_GRAPHS = "residual-sum"  # ``Sum`` + ``LayerNormalization`` (:func:`residual_sums`)


def graph_form(use_gpu: bool) -> str:
    """The form of the graphs built for a GPU (``use_gpu``) or a CPU target: :data:`GPU_GRAPHS` or
    :data:`CPU_GRAPHS`."""
    return GPU_GRAPHS if use_gpu else CPU_GRAPHS


FUSED_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu",
             "LayerNormalization")


def input_names_for(config) -> list[str]:
    """ONNX inputs of a sequence classifier of this family: token types only where the family uses them."""
    names = ["input_ids", "attention_mask"]
    if config.model_type == "bert" and getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def dummy_inputs(config, batch: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, config.vocab_size - 1), (batch, seq_len), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    if "token_type_ids" in input_names_for(config):
        inputs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
    return inputs


def export_onnx(model: torch.nn.Module, path: str | Path, batch: int = 1, seq_len: int = 128) -> Path:
    """Export a (sliced) HF sequence classifier: inputs per :func:`input_names_for`, output ``logits``,
    dynamic batch and sequence axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = input_names_for(model.config)
    inputs = dummy_inputs(model.config, batch, seq_len)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (), str(path), kwargs={n: inputs[n] for n in names}, input_names=names,
            output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    return path


def optimize_onnx(src: str | Path, dst: str | Path, config, use_gpu: bool = False, fp16: bool = False,
                  form: str | None = None) -> dict[str, int]:
    """Fuse with ``onnxruntime.transformers.optimizer``; returns the fused operator counts.

    Head counts are read per layer from each layer's reshape (``num_heads=0``), so layers with different head
    counts each fuse into an ``Attention`` node. ``form`` (default :func:`graph_form`): :data:`CPU_GRAPHS` keeps the
    residual adds apart from ``LayerNormalization``, as ``Sum`` (:func:`residual_sums`); :data:`GPU_GRAPHS` fuses
    them into ``SkipLayerNormalization``.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    form = form or graph_form(use_gpu)
    if form not in (CPU_GRAPHS, GPU_GRAPHS):
        raise ValueError(f"unknown graph form '{form}' ({CPU_GRAPHS}, {GPU_GRAPHS})")
    options = FusionOptions("bert")
    if form == CPU_GRAPHS:
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    opt = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, optimization_options=options,
        use_gpu=use_gpu, only_onnxruntime=False,
    )
    if form == CPU_GRAPHS:
        residual_sums(opt.model)
    if fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return stats


def residual_sums(model) -> int:
    """Turn each residual ``Add`` that feeds a ``LayerNormalization`` (an add of two computed tensors, not of a
    bias) into ``Sum``, in place; returns how many. Same arithmetic; but ONNX Runtime's session optimizer fuses
    ``Add`` -> ``LayerNormalization`` back into ``SkipLayerNormalization`` (``SkipLayerNormFusion``, on by default,
    so in any user's plain session too), and it matches ``Add`` only."""
    constants = {t.name for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    changed = 0
    for node in model.graph.node:
        add = producer.get(node.input[0]) if node.op_type == "LayerNormalization" and node.input else None
        if add is not None and add.op_type == "Add" and not any(i in constants for i in add.input):
            add.op_type = "Sum"
            changed += 1
    return changed


def quantize_int8(src: str | Path, dst: str | Path, *, per_channel: bool = True, op_types: list[str] | None = None,
                  exclude: list[str] | tuple = ()) -> Path:
    """Dynamic int8 quantization of the weights (ONNX Runtime's quantizer): ``op_types`` the operators quantized
    (default: the quantizer's own, MatMul, Attention, Gather, ...), ``exclude`` node names kept in float.

    ``per_channel`` (default): one weight scale per output column instead of one per tensor. On five recovered
    points of a default compile (the unpruned network and four sub-networks; ``benchmarks/bench_quantization.py``)
    it cost 0.34 points on average against 0.78 per tensor, less on both halves of the dev set, at the same speed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # fused contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape inference: say the tensors are float
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=op_types, nodes_to_exclude=list(exclude),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


def count_ops(path: str | Path) -> dict[str, int]:
    import collections

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def build_onnx(model: torch.nn.Module, dst: str | Path, precision: str = "fp32", batch: int = 1, seq_len: int = 128,
               use_gpu: bool = False, form: str | None = None) -> dict[str, int]:
    """Export + fuse (+ quantize for int8, or fp16 conversion) into ``dst``; returns fused operator counts.
    ``form``: the graph form (:func:`optimize_onnx`; default: the device's, :func:`graph_form`).

    A model whose self-attention still has Hugging Face's forward (a plain classifier, not a sliced one) is exported
    from a copy that writes each layer's head count into its reshape (:func:`toolchain.core.slicing.with_explicit_heads`;
    no weight changes). Without it ONNX Runtime fuses no ``Attention`` (nor ``EmbedLayerNormalization``), and the
    unpruned model would be timed as an unfused graph, slower than the same network sliced.
    """
    from toolchain.core.slicing import with_explicit_heads

    model = with_explicit_heads(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    raw = dst.with_suffix(".raw.onnx")
    fused = dst.with_suffix(".fused.onnx")
    try:
        export_onnx(model, raw, batch, seq_len)
        stats = optimize_onnx(raw, fused, model.config, use_gpu=use_gpu, fp16=precision == "fp16", form=form)
        if precision == "int8":
            quantize_int8(fused, dst)
        elif precision in ("fp32", "fp16"):
            fused.replace(dst)
        else:
            raise ValueError(f"unknown precision '{precision}' (fp32, fp16, int8)")
    finally:
        for p in (raw, fused):
            p.unlink(missing_ok=True)
    return stats
