"""Physical slicing: a sub-network of the super-network becomes a smaller, standalone Hugging Face model.

transformers 5.x has no ``prune_heads``: this module shrinks the ``nn.Linear`` layers of each encoder layer, drops
removed layers, and replaces zero-width blocks by modules that compute what a zero-width block computes
(``LayerNorm(x + b_out)``) without zero-width tensors, which the ONNX exporter cannot handle.

The sliced model keeps the Hugging Face module tree, so its forward pass, ``save_pretrained`` and the ONNX export
(eager attention, fused by ONNX Runtime into ``Attention`` nodes) are those of transformers. Its config carries the
per-layer widths as ``nasprune_heads`` / ``nasprune_units``.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch
from torch import nn

from toolchain.core.atomic import write_json_atomic
from toolchain.core.modeling import encoder_of, layers_of, model_from_config
from toolchain.core.subnetwork import SubNetwork


class ZeroHeadAttention(nn.Module):
    """An attention block that keeps no head: ``LayerNorm(x + b_out)``. Returns ``(out, None)`` like HF's."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden_states, *args, **kwargs):
        return self.LayerNorm(hidden_states + self.bias), None


class ZeroUnitOutput(nn.Module):
    """The FFN output of a layer that keeps no FFN unit: ``LayerNorm(x + b_out)`` (the intermediate is Identity)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(input_tensor + self.bias)


def _explicit_heads_forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
    """HF's self-attention forward, with the head count written into the reshape instead of ``-1``.

    ONNX Runtime's attention fusion reads the head count of each layer from that reshape; with ``-1`` it falls back
    to one global ``num_heads`` and cannot fuse layers whose head counts differ.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, self.num_attention_heads, self.attention_head_size)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.dropout.p, scaling=self.scaling, **kwargs)
    return out.reshape(*input_shape, self.all_head_size).contiguous(), weights


def _take_rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[idx])
    return new


def _take_cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def head_columns(heads: list[int], head_size: int) -> torch.Tensor:
    """Indices of the Q/K/V output features that belong to ``heads``."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads])


def _slice_attention(layer, heads: list[int], head_size: int, eps: float) -> None:
    att = layer.attention
    if not heads:
        zero = ZeroHeadAttention(att.output.dense.out_features, eps)
        with torch.no_grad():
            zero.bias.copy_(att.output.dense.bias)
            zero.LayerNorm.load_state_dict(att.output.LayerNorm.state_dict())
        layer.attention = zero
        return
    cols = head_columns(heads, head_size)
    sa = att.self
    sa.query, sa.key, sa.value = (_take_rows(m, cols) for m in (sa.query, sa.key, sa.value))
    sa.num_attention_heads = len(heads)
    sa.all_head_size = len(heads) * head_size
    sa.forward = types.MethodType(_explicit_heads_forward, sa)
    att.output.dense = _take_cols(att.output.dense, cols)


def _self_attentions(model) -> list[nn.Module]:
    return [layer.attention.self for layer in layers_of(model) if hasattr(layer.attention, "self")]


def with_explicit_heads(model: nn.Module) -> nn.Module:
    """``model`` if every self-attention already writes its head count into its reshape (sliced models do), else a
    copy whose self-attentions do. Without it (HF's ``-1``), ONNX Runtime fuses no ``Attention`` for that layer."""
    if all(getattr(sa.forward, "__func__", None) is _explicit_heads_forward for sa in _self_attentions(model)):
        return model
    model = copy.deepcopy(model)
    for sa in _self_attentions(model):
        sa.forward = types.MethodType(_explicit_heads_forward, sa)
    return model


def _slice_ffn(layer, units: list[int], eps: float) -> None:
    if not units:
        zero = ZeroUnitOutput(layer.output.dense.out_features, eps)
        with torch.no_grad():
            zero.bias.copy_(layer.output.dense.bias)
            zero.LayerNorm.load_state_dict(layer.output.LayerNorm.state_dict())
        layer.intermediate = nn.Identity()
        layer.output = zero
        return
    idx = torch.tensor(units, dtype=torch.long)
    layer.intermediate.dense = _take_rows(layer.intermediate.dense, idx)
    layer.output.dense = _take_cols(layer.output.dense, idx)


def slice_model(model: nn.Module, subnet: SubNetwork) -> nn.Module:
    """A physically smaller copy of ``model`` (a HF sequence classifier) that computes ``subnet``."""
    cfg = model.config
    subnet.validate_for(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
    sliced = copy.deepcopy(model)
    head_size = cfg.hidden_size // cfg.num_attention_heads
    eps = cfg.layer_norm_eps
    layers = layers_of(sliced)
    kept = []
    for i in subnet.kept_layers:
        layer = layers[i]
        _slice_attention(layer, subnet.heads_of(i), head_size, eps)
        _slice_ffn(layer, subnet.units_of(i), eps)
        kept.append(layer)
    encoder_of(sliced).encoder.layer = nn.ModuleList(kept)
    _set_layer_config(sliced.config, [subnet.heads[i] for i in subnet.kept_layers],
                      [subnet.units[i] for i in subnet.kept_layers])
    return sliced.eval()


def _set_layer_config(config, heads: list[int], units: list[int]) -> None:
    config.num_hidden_layers = len(heads)
    config.nasprune_heads = list(heads)
    config.nasprune_units = list(units)


def skeleton_from_config(config) -> nn.Module:
    """An (untrained) sliced model with the shapes recorded in ``config`` (``nasprune_heads/units``)."""
    heads, units = list(config.nasprune_heads), list(config.nasprune_units)
    model = model_from_config(copy.deepcopy(config))
    head_size = config.hidden_size // config.num_attention_heads
    for layer, h, u in zip(layers_of(model), heads, units):
        _slice_attention(layer, list(range(h)), head_size, config.layer_norm_eps)
        _slice_ffn(layer, list(range(u)), config.layer_norm_eps)
    return model.eval()


def save_sliced(model: nn.Module, folder: str | Path, tokenizer=None, subnet: SubNetwork | None = None) -> Path:
    """Write ``config.json`` (with per-layer widths) and ``model.safetensors`` (+ tokenizer files)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if subnet is not None:
        write_json_atomic(folder / "subnetwork.json", subnet.to_dict(), indent=None)
    return folder


def load_sliced(folder: str | Path) -> nn.Module:
    """Load a model written by :func:`save_sliced` (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing (expected a folder written by save_sliced)")
    config = AutoConfig.from_pretrained(folder)
    if not hasattr(config, "nasprune_heads"):
        raise ValueError(f"{folder / 'config.json'} has no nasprune_heads/nasprune_units: not a sliced nasprune model")
    model = skeleton_from_config(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()
