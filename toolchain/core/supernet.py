"""The weight-sharing super-network: any sub-network runs on the fine-tuned weights through masks.

Masks are applied to the *inputs* of each layer's two output projections (``attention.output.dense`` gets a per-head
mask, ``output.dense`` a per-FFN-unit mask), so a masked-out head or unit contributes exactly nothing and a fully
masked block computes ``LayerNorm(x + b_out)`` -- the same as the zero-width modules of :mod:`toolchain.core.slicing`.
Dropped layers are removed from the layer list for the duration of the forward pass (no wasted compute).

Usage::

    supernet = SuperNetwork(model)
    with supernet.use(subnet):
        logits = model(**batch).logits
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from toolchain.core.modeling import ModelDims, encoder_of, layers_of
from toolchain.core.slicing import head_columns, slice_model
from toolchain.core.subnetwork import SubNetwork


class SuperNetwork:
    def __init__(self, model: nn.Module):
        self.model = model
        self.dims = ModelDims.from_config(model.config)
        self._all_layers = layers_of(model)
        n = self.dims.num_layers
        self._head_masks: list[torch.Tensor | None] = [None] * n  # (num_heads*head_size,) feature masks
        self._unit_masks: list[torch.Tensor | None] = [None] * n
        self._handles = []
        for i, layer in enumerate(self._all_layers):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._hook(self._head_masks, i)))
            self._handles.append(layer.output.dense.register_forward_pre_hook(self._hook(self._unit_masks, i)))

    @staticmethod
    def _hook(masks: list, i: int):
        def pre_hook(module, args):
            m = masks[i]
            if m is None:
                return None
            return (args[0] * m.to(args[0].dtype),) + tuple(args[1:])

        return pre_hook

    @property
    def config(self):
        return self.model.config

    def full(self) -> SubNetwork:
        d = self.dims
        return SubNetwork.full(d.num_layers, d.num_heads, d.intermediate_size)

    # ------------------------------------------------------------------ masks
    def feature_masks(self, subnet: SubNetwork) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        d = self.dims
        device = next(self.model.parameters()).device
        hm, um = [], []
        for i in range(d.num_layers):
            if subnet.heads[i] == d.num_heads and subnet.head_index is None:
                hm.append(None)
            else:
                m = torch.zeros(d.num_heads * d.head_size, device=device)
                m[head_columns(subnet.heads_of(i), d.head_size).to(device)] = 1.0
                hm.append(m)
            if subnet.units[i] == d.intermediate_size and subnet.unit_index is None:
                um.append(None)
            else:
                m = torch.zeros(d.intermediate_size, device=device)
                m[torch.tensor(subnet.units_of(i), dtype=torch.long, device=device)] = 1.0
                um.append(m)
        return hm, um

    @contextmanager
    def use(self, subnet: SubNetwork | None) -> Iterator[nn.Module]:
        """Run ``self.model`` as ``subnet`` inside the block (``None`` = the full network)."""
        d = self.dims
        if subnet is None:
            subnet = self.full()
        subnet.validate_for(d.num_layers, d.num_heads, d.intermediate_size)
        hm, um = self.feature_masks(subnet)
        self._head_masks[:], self._unit_masks[:] = hm, um
        encoder = encoder_of(self.model).encoder
        encoder.layer = nn.ModuleList([self._all_layers[i] for i in subnet.kept_layers])
        try:
            yield self.model
        finally:
            encoder.layer = self._all_layers
            self._head_masks[:] = [None] * d.num_layers
            self._unit_masks[:] = [None] * d.num_layers

    def __call__(self, subnet: SubNetwork | None = None, **batch):
        with self.use(subnet) as model:
            return model(**batch)

    def slice(self, subnet: SubNetwork) -> nn.Module:
        """The sub-network as a physically smaller standalone model."""
        return slice_model(self.model, subnet)

    # ------------------------------------------------------------ re-ordering
    @torch.no_grad()
    def reorder_(self, head_order: list[list[int]], unit_order: list[list[int]]) -> None:
        """Permute heads and FFN units inside each layer (most important first). The full network is unchanged."""
        d = self.dims
        for layer, ho, uo in zip(self._all_layers, head_order, unit_order):
            cols = head_columns(list(ho), d.head_size)
            sa = layer.attention.self
            for lin in (sa.query, sa.key, sa.value):
                lin.weight.copy_(lin.weight[cols])
                lin.bias.copy_(lin.bias[cols])
            out = layer.attention.output.dense
            out.weight.copy_(out.weight[:, cols])
            uidx = torch.as_tensor(list(uo), dtype=torch.long)
            inter = layer.intermediate.dense
            inter.weight.copy_(inter.weight[uidx])
            inter.bias.copy_(inter.bias[uidx])
            out = layer.output.dense
            out.weight.copy_(out.weight[:, uidx])
