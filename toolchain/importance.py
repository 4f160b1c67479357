"""Importance re-ordering of heads and FFN units (beyond the paper).

Each head and each FFN unit gets a Fisher-information score (Michel et al. 2019; Kwon et al. 2022): the squared
gradient of the loss with respect to a multiplicative mask variable of value 1, summed over mini-batches of training
data. Heads and units are then permuted inside each layer so that the first k are the k most important -- the MEDIUM
and SMALL spaces keep "the first k", so they keep the most important ones. A permutation inside a layer leaves the
full network's function unchanged.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from toolchain.core.data import batches
from toolchain.core.supernet import SuperNetwork


def fisher_scores(supernet: SuperNetwork, encoded: dict[str, torch.Tensor], batch_size: int = 8,
                  max_batches: int = 64, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``(L, H)`` and per-unit ``(L, I)`` Fisher scores on ``encoded`` (tokenized training data)."""
    d = supernet.dims
    model = supernet.model
    was_training = model.training
    model.eval()  # no dropout: scores of the deterministic network
    head_vars = [torch.ones(d.num_heads, requires_grad=True) for _ in range(d.num_layers)]
    unit_vars = [torch.ones(d.intermediate_size, requires_grad=True) for _ in range(d.num_layers)]
    head_fisher = torch.zeros(d.num_layers, d.num_heads)
    unit_fisher = torch.zeros(d.num_layers, d.intermediate_size)
    n_batches = min(max_batches, -(-len(encoded["input_ids"]) // batch_size))
    it = batches(encoded, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _, batch in zip(tqdm(range(n_batches), desc="importance", disable=not progress, leave=False), it):
        supernet._head_masks[:] = [v.repeat_interleave(d.head_size) for v in head_vars]
        supernet._unit_masks[:] = list(unit_vars)
        try:
            loss = model(**batch).loss
        finally:
            supernet._head_masks[:] = [None] * d.num_layers
            supernet._unit_masks[:] = [None] * d.num_layers
        grads = torch.autograd.grad(loss, head_vars + unit_vars)
        head_fisher += torch.stack(grads[: d.num_layers]).pow(2)
        unit_fisher += torch.stack(grads[d.num_layers:]).pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return head_fisher, unit_fisher


def reorder_by_importance(supernet: SuperNetwork, encoded: dict[str, torch.Tensor], **kw) -> dict:
    """Score, then permute in place (most important first). Returns the orders and scores (JSON-able)."""
    head_scores, unit_scores = fisher_scores(supernet, encoded, **kw)
    head_order = torch.argsort(head_scores, dim=1, descending=True, stable=True).tolist()
    unit_order = torch.argsort(unit_scores, dim=1, descending=True, stable=True).tolist()
    supernet.reorder_(head_order, unit_order)
    return {"method": "fisher", "head_order": head_order, "unit_order": unit_order,
            "head_scores": head_scores.tolist()}
