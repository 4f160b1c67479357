"""Retraining-free structural pruning: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers".

A fine-tuned classifier is pruned under a cost budget (latency predicted by a
:class:`~latency_models.lookup_table.LatencyTable`, or any ``cost(SubNetwork) -> float`` such as a parameter count)
in four steps, with no retraining:

1. :func:`mask_gradients` -- per-sample gradients of the task loss w.r.t. a mask of value 1 on every head and FFN unit
   (one backward per batch: the mask has a batch dimension, so the gradient of the summed loss is per sample);
2. :func:`search_mask` -- diagonal Fisher importance, global ranking, and for every number of kept heads the most
   FFN units that fit the budget (binary search); the choice that removes the least importance wins;
3. :func:`rearrange_mask` -- per layer, re-pick *which* heads / units to remove with the layer's empirical Fisher block
   (greedy on ``0.5 (1-m)^T F (1-m)``), keeping the per-layer counts;
4. :func:`tune_mask` -- per layer, least-squares scales of the kept heads / units that reconstruct the unpruned
   layer's output projections; :func:`apply_scales` folds them into a sliced copy of the model.

:func:`prune` runs all four for a list of budgets (gradients once). See docs/rfp.md.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from toolchain.core.data import TaskSpec, batches
from toolchain.core.modeling import ModelDims, layers_of
from toolchain.core.slicing import head_columns, slice_model
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork

Cost = Callable[[SubNetwork], float]


@dataclass
class MaskGradients:
    """Per-layer per-sample mask gradients: ``heads[l]`` is ``(N, H)``, ``units[l]`` is ``(N, U)``."""

    heads: list[torch.Tensor]
    units: list[torch.Tensor]
    index: torch.Tensor  # the rows of ``encoded`` they were computed on (dataset order)

    def head_importance(self) -> torch.Tensor:
        """Diagonal Fisher importance ``(L, H)``: sum over samples of g^2."""
        return torch.stack([g.double().pow(2).sum(0) for g in self.heads])

    def unit_importance(self) -> torch.Tensor:
        return torch.stack([g.double().pow(2).sum(0) for g in self.units])


@dataclass
class Scales:
    """Per layer, one scale per kept head / unit, in the order of ``subnet.heads_of(l)`` / ``units_of(l)``."""

    heads: list[list[float]]
    units: list[list[float]]
    errors: list[dict] = field(default_factory=list)  # per tuned block: relative reconstruction error before/after

    @classmethod
    def ones(cls, subnet: SubNetwork) -> "Scales":
        return cls([[1.0] * h for h in subnet.heads], [[1.0] * u for u in subnet.units])

    def to_dict(self) -> dict:
        return {"heads": self.heads, "units": self.units, "errors": self.errors}

    @classmethod
    def from_dict(cls, d: dict) -> "Scales":
        return cls([[float(s) for s in r] for r in d["heads"]], [[float(s) for s in r] for r in d["units"]],
                   list(d.get("errors", [])))


@dataclass
class RFPResult:
    budget: float
    subnet: SubNetwork
    scales: Scales | None
    cost: float  # cost(subnet), <= budget
    timings: dict[str, float]  # seconds per phase ("gradients" is shared by all budgets of one prune call)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "subnetwork": self.subnet.to_dict(), "cost": self.cost,
                "scales": self.scales.to_dict() if self.scales else None, "timings": self.timings}


# ------------------------------------------------------------------------------------------------------ helpers
def _as_cost(cost) -> Cost:
    return cost.predict_latency if hasattr(cost, "predict_latency") else cost


def _check_budget(budget, cost: Cost, num_layers: int) -> float:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"a budget must be a positive finite number, got {budget!r}")
    floor = float(cost(SubNetwork((0,) * num_layers, (0,) * num_layers)))
    if floor > budget:
        raise ValueError(f"budget {budget:g} cannot be met: the smallest achievable cost (every head and FFN unit "
                         f"removed) is {floor:.4g} (ms for a latency table)")
    return float(budget)


def _sample(encoded: dict[str, torch.Tensor], n_samples: int, seed: int):
    n = len(encoded["input_ids"])
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    rows = torch.arange(n) if n_samples >= n else \
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_samples].sort().values
    return rows, {k: v[rows] for k, v in encoded.items()}


def _dense(layer: nn.Module, block: str) -> nn.Linear:
    return layer.attention.output.dense if block == "attention" else layer.output.dense


@contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Summed (not mean) loss, so that its mask gradient is the sum of per-sample gradients."""
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels.long(), reduction="sum")


# ------------------------------------------------------------------------------------------ 1. mask gradients
def mask_gradients(model: nn.Module, encoded: dict[str, torch.Tensor], spec: TaskSpec | None = None,
                   n_samples: int = 256, batch_size: int = 16, seed: int = 0, progress: bool = True) -> MaskGradients:
    """Per-sample gradients of the task loss w.r.t. head / unit masks of value 1, on ``n_samples`` rows of
    ``encoded`` (tokenized training data with ``labels``) drawn with ``seed`` (all rows when there are fewer)."""
    d = ModelDims.from_config(model.config)
    if "labels" not in encoded:
        raise ValueError("mask gradients need labelled data (encoded['labels'])")
    if spec is not None and spec.num_labels != d.num_labels:
        raise ValueError(f"task {spec.name!r} has {spec.num_labels} labels, the model's head {d.num_labels}")
    regression = spec.is_regression if spec is not None else d.num_labels == 1
    rows, data = _sample(encoded, n_samples, seed)
    device = next(model.parameters()).device
    masks: dict = {}

    def hook(key):
        return lambda module, args: (args[0] * masks[key].to(args[0].dtype),) + tuple(args[1:])

    handles = [_dense(layer, b).register_forward_pre_hook(hook((b, i)))
               for i, layer in enumerate(layers_of(model)) for b in ("attention", "ffn")]
    heads, units = [[] for _ in range(d.num_layers)], [[] for _ in range(d.num_layers)]
    try:
        with _eval(model):
            todo = list(batches(data, batch_size))
            for batch in tqdm(todo, desc="mask gradients", disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                hv = [torch.ones(len(labels), d.num_heads, device=device, requires_grad=True) for _ in heads]
                uv = [torch.ones(len(labels), d.intermediate_size, device=device, requires_grad=True) for _ in units]
                for i in range(d.num_layers):  # (B, 1, features): broadcast over tokens, one mask per sample
                    masks["attention", i] = hv[i].repeat_interleave(d.head_size, dim=1)[:, None]
                    masks["ffn", i] = uv[i][:, None]
                grads = torch.autograd.grad(_loss(model(**batch).logits, labels, regression), hv + uv)
                for i in range(d.num_layers):
                    heads[i].append(grads[i].detach().cpu())
                    units[i].append(grads[d.num_layers + i].detach().cpu())
    finally:
        for h in handles:
            h.remove()
    return MaskGradients([torch.cat(g) for g in heads], [torch.cat(g) for g in units], rows)


# ---------------------------------------------------------------------------------------------- 2. mask search
def _from_flat(head_ids: torch.Tensor, unit_ids: torch.Tensor, L: int, H: int, U: int) -> SubNetwork:
    """Kept heads / units given as flat ``layer * width + index`` ids -> SubNetwork with explicit indices."""
    def rows(ids, width):
        ids = ids.sort().values
        counts = torch.bincount(ids // width, minlength=L).tolist()
        pos, ends = (ids % width).tolist(), list(itertools.accumulate(counts))
        return counts, tuple(tuple(pos[e - c:e]) for c, e in zip(counts, ends))
    (hc, hi), (uc, ui) = rows(head_ids, H), rows(unit_ids, U)
    return SubNetwork(hc, uc, hi, ui)


def search_mask(grads: MaskGradients, budget: float, cost) -> SubNetwork:
    """The kept heads / units that remove the least diagonal Fisher importance with ``cost(subnet) <= budget``.

    ``cost`` is a callable on :class:`SubNetwork` (or a LatencyTable: its ``predict_latency``); it must be
    non-decreasing in the number of kept units.
    """
    cost = _as_cost(cost)
    hi, ui = grads.head_importance(), grads.unit_importance()
    (L, H), U = hi.shape, ui.shape[1]
    budget = _check_budget(budget, cost, L)
    h_score, h_order = hi.flatten().sort(descending=True, stable=True)
    u_score, u_order = ui.flatten().sort(descending=True, stable=True)
    # removed importance when the top k are kept: the sum of the tail, k = 0..len
    h_removed = torch.cat([h_score.flip(0).cumsum(0).flip(0), h_score.new_zeros(1)])
    u_removed = torch.cat([u_score.flip(0).cumsum(0).flip(0), u_score.new_zeros(1)])

    def fits(h, n):  # the top h heads and top n units
        return cost(_from_flat(h_order[:h], u_order[:n], L, H, U)) <= budget

    best, best_loss = None, math.inf
    for h in range(L * H + 1):
        if not fits(h, 0):
            continue
        lo, top = 0, L * U  # the largest n with fits(h, n): fits(h, lo) holds, fits(h, top + 1) does not
        while lo < top:
            mid = (lo + top + 1) // 2
            lo, top = (mid, top) if fits(h, mid) else (lo, mid - 1)
        loss = float(h_removed[h] + u_removed[lo])
        if loss < best_loss:
            best, best_loss = (h, lo), loss
    return _from_flat(h_order[:best[0]], u_order[:best[1]], L, H, U)  # best is set: h = 0, n = 0 fits


# ------------------------------------------------------------------------------------------ 3. rearrangement
def _quadratic(F_: torch.Tensor, removed: Sequence[int]) -> float:
    idx = torch.as_tensor(list(removed), dtype=torch.long)
    return 0.5 * float(F_[idx][:, idx].sum())


def _rearrange(G: torch.Tensor, kept: list[int]) -> list[int]:
    n = G.shape[1]
    k = n - len(kept)
    if k in (0, n):
        return kept
    F_ = G.double().T @ G.double()
    diag_removed = sorted(set(range(n)) - set(kept))
    removed, with_removed = [], torch.zeros(n, dtype=torch.float64)  # with_removed = F[:, removed].sum(1)
    free = torch.ones(n, dtype=torch.bool)
    for _ in range(k):  # add the item that increases (1-m)^T F (1-m) the least
        increase = torch.where(free, F_.diagonal() + 2 * with_removed, math.inf)
        j = int(increase.argmin())
        removed.append(j)
        free[j] = False
        with_removed += F_[:, j]
    if _quadratic(F_, removed) <= _quadratic(F_, diag_removed):
        return sorted(set(range(n)) - set(removed))
    return kept


def rearrange_mask(grads: MaskGradients, subnet: SubNetwork) -> SubNetwork:
    """Same per-layer counts; per layer, the removed heads / units chosen greedily on the empirical Fisher block."""
    L = subnet.num_layers
    hi = tuple(tuple(_rearrange(grads.heads[i], subnet.heads_of(i))) for i in range(L))
    ui = tuple(tuple(_rearrange(grads.units[i], subnet.units_of(i))) for i in range(L))
    return SubNetwork(subnet.heads, subnet.units, hi, ui)


# ------------------------------------------------------------------------------------------------ 4. tuning
class _Stop(Exception):
    pass


def _capture(model: nn.Module, module: nn.Module, batch: dict) -> torch.Tensor:
    """The input of ``module`` in a forward pass of ``model`` (the pass stops there)."""
    seen = {}

    def hook(_, args):
        seen["x"] = args[0].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


def _fold_(layer: nn.Module, block: str, kept: list[int], scales: torch.Tensor, head_size: int) -> None:
    """Multiply the input columns of the block's output projection that belong to ``kept`` by ``scales``."""
    w = _dense(layer, block).weight
    if block == "attention":
        cols, scales = head_columns(kept, head_size), scales.repeat_interleave(head_size)
    else:
        cols = torch.as_tensor(kept, dtype=torch.long)
    with torch.no_grad():
        w[:, cols] *= scales.to(w)


def _solve(AtA: torch.Tensor, Atb: torch.Tensor, btb: float) -> tuple[torch.Tensor, float, float]:
    """Ridge least squares, clamped to [-10, 10]; keeps all-ones unless the scales lower the error."""
    ones = torch.ones_like(Atb)

    def error(s):  # ||A s - b||^2 / ||b||^2 from the normal equations
        return float(s @ AtA @ s - 2 * s @ Atb + btb) / max(btb, 1e-300)
    before = error(ones)
    ridge = 1e-4 * float(AtA.diagonal().mean())
    if not ridge > 0:
        return ones, before, before
    s = torch.linalg.solve(AtA + ridge * torch.eye(len(Atb), dtype=AtA.dtype), Atb).clamp(-10.0, 10.0)
    after = error(s)
    return (s, before, after) if after < before else (ones, before, before)


@torch.no_grad()
def tune_mask(model: nn.Module, subnet: SubNetwork, encoded: dict[str, torch.Tensor], n_samples: int = 256,
              batch_size: int = 16, seed: int = 0, progress: bool = True) -> Scales:
    """Least-squares scales of the kept heads / units, layer by layer (attention, then FFN), so that the pruned
    model's output projections reconstruct the unpruned model's on ``n_samples`` rows of ``encoded``."""
    d = ModelDims.from_config(model.config)
    subnet.validate_for(d.num_layers, d.num_heads, d.intermediate_size)
    device = next(model.parameters()).device
    _, data = _sample({k: v for k, v in encoded.items() if k != "labels"}, n_samples, seed)
    todo = [{k: v.to(device) for k, v in b.items()} for b in batches(data, batch_size)]
    work = copy.deepcopy(model).eval()  # pruned model; scales are folded into it as they are found
    pruned = SuperNetwork(work)
    scales = Scales.ones(subnet)
    steps = [(i, b) for i in subnet.kept_layers for b in ("attention", "ffn")
             if (subnet.heads if b == "attention" else subnet.units)[i] > 0]
    with _eval(model):
        for i, block in tqdm(steps, desc="mask tuning", disable=not progress, leave=False):
            kept = subnet.heads_of(i) if block == "attention" else subnet.units_of(i)
            W = _dense(layers_of(model)[i], block).weight.double()  # (hidden, features), bias left aside
            AtA = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=device)
            Atb = torch.zeros(len(kept), dtype=torch.float64, device=device)
            btb = 0.0
            work_dense = _dense(layers_of(work)[i], block)  # taken outside use(): there the list holds kept layers only
            for batch in todo:
                tokens = batch["attention_mask"].bool()  # non-padding tokens only
                target = _capture(model, _dense(layers_of(model)[i], block), batch)[tokens].double() @ W.T
                with pruned.use(subnet):
                    x = _capture(work, work_dense, batch)[tokens].double()
                if block == "attention":  # A[t, h] = W_O[:, cols_h] @ ctx_h(t): one (T, hidden) column per head
                    cols = head_columns(kept, d.head_size).view(len(kept), d.head_size)
                    A = torch.einsum("tkd,okd->tko", x[:, cols], W[:, cols])
                    AtA += torch.einsum("tko,tjo->kj", A, A)
                    Atb += torch.einsum("tko,to->k", A, target)
                else:  # A[t, u] = act_u(t) * W2[:, u]
                    act, Wk = x[:, kept], W[:, kept]
                    AtA += (act.T @ act) * (Wk.T @ Wk)
                    Atb += ((target @ Wk) * act).sum(0)
                btb += float(target.pow(2).sum())
            s, before, after = _solve(AtA.cpu(), Atb.cpu(), btb)
            (scales.heads if block == "attention" else scales.units)[i] = s.tolist()
            scales.errors.append({"layer": i, "block": block, "before": before, "after": after})
            _fold_(layers_of(work)[i], block, kept, s, d.head_size)
    return scales


def _check_scales(subnet: SubNetwork, scales: Scales) -> None:
    for name, counts, rows in (("heads", subnet.heads, scales.heads), ("units", subnet.units, scales.units)):
        if [len(r) for r in rows] != list(counts):
            raise ValueError(f"scales do not match the sub-network: {[len(r) for r in rows]} {name} scales per "
                             f"layer, the sub-network keeps {list(counts)}")


def fold_scales(model: nn.Module, subnet: SubNetwork, scales: Scales) -> nn.Module:
    """A full-size copy of ``model`` with ``scales`` folded into the kept heads' and units' output columns:
    masking or slicing it with ``subnet`` gives the rescaled pruned model (``model`` is left untouched)."""
    _check_scales(subnet, scales)
    folded = copy.deepcopy(model)
    head_size = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(layers_of(folded)):
        if scales.heads[i]:
            _fold_(layer, "attention", subnet.heads_of(i), torch.tensor(scales.heads[i]), head_size)
        if scales.units[i]:
            _fold_(layer, "ffn", subnet.units_of(i), torch.tensor(scales.units[i]), head_size)
    return folded


def apply_scales(model: nn.Module, subnet: SubNetwork, scales: Scales) -> nn.Module:
    """A sliced copy of ``model`` computing ``subnet`` with ``scales`` folded in (``model`` is left untouched)."""
    return slice_model(fold_scales(model, subnet, scales), subnet)


# ----------------------------------------------------------------------------------------------- all of it
def prune(model: nn.Module, encoded: dict[str, torch.Tensor], spec: TaskSpec | None, budgets: Sequence[float],
          cost, n_samples: int = 256, batch_size: int = 16, seed: int = 0, rearrange: bool = True,
          tune: bool = True, progress: bool = True) -> list[RFPResult]:
    """Kwon et al.'s pipeline for each budget (gradients computed once). ``cost``: a callable on SubNetwork or a
    LatencyTable (latency in ms). Apply a result with ``apply_scales(model, r.subnet, r.scales)``."""
    cost = _as_cost(cost)
    if isinstance(budgets, (int, float)) or not len(budgets):
        raise ValueError(f"budgets must be a non-empty list of positive numbers, got {budgets!r}")
    budgets = [_check_budget(b, cost, model.config.num_hidden_layers) for b in budgets]  # fail before the work
    t = time.perf_counter()
    grads = mask_gradients(model, encoded, spec, n_samples, batch_size, seed, progress)
    t_grads = time.perf_counter() - t
    results = []
    for budget in budgets:
        timings = {"gradients": t_grads}
        t = time.perf_counter()
        subnet = search_mask(grads, budget, cost)
        timings["search"] = time.perf_counter() - t
        if rearrange:
            t = time.perf_counter()
            subnet = rearrange_mask(grads, subnet)
            timings["rearrange"] = time.perf_counter() - t
        scales = None
        if tune:
            t = time.perf_counter()
            scales = tune_mask(model, subnet, encoded, n_samples, batch_size, seed, progress)
            timings["tune"] = time.perf_counter() - t
        results.append(RFPResult(budget, subnet, scales, float(cost(subnet)), timings))
    return results
