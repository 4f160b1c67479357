"""What a user would pick instead of nasprune's search, as sub-networks and models on the same axes.

- ``layer_drop``: keep the first ``k`` encoder layers of the pre-trained model and fine-tune that smaller model
  (:func:`layer_drop_subnet` + :func:`fine_tune`).
- ``uniform``: the same fraction of heads and FFN units in every layer (:func:`uniform_subnet`), the fixed-ratio
  pruning that Klein et al. argue against; a sub-network like any other, so it runs on the super-network's weights.
- the retraining-free method of Kwon et al. is a product method of its own (:mod:`toolchain.rfp`, ``--method rfp``).

:func:`pick` chooses, among evaluated points, what a user would ship under a latency budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .data import TaskSpec, batches, compute_metrics
from .modeling import ModelDims
from .subnetwork import SubNetwork
from .training import TrainConfig, train


def layer_drop_subnet(dims: ModelDims, k: int) -> SubNetwork:
    """The first ``k`` layers at full width, the others dropped."""
    if not 1 <= k <= dims.num_layers:
        raise ValueError(f"k must be in [1, {dims.num_layers}], got {k}")
    n = dims.num_layers
    return SubNetwork(tuple(dims.num_heads if i < k else 0 for i in range(n)),
                      tuple(dims.intermediate_size if i < k else 0 for i in range(n)))


def uniform_subnet(dims: ModelDims, ratio: float) -> SubNetwork:
    """``ratio`` of the heads and of the FFN units (rounded, at least one of each) in every layer."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    h = max(1, round(ratio * dims.num_heads))
    u = max(1, round(ratio * dims.intermediate_size))
    return SubNetwork((h,) * dims.num_layers, (u,) * dims.num_layers)


class _Whole:
    """What :func:`toolchain.training.train` uses of a super-network, for a model that is trained whole."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def config(self):
        return self.model.config

    def __call__(self, subnet=None, **batch):
        return self.model(**batch)


def fine_tune(model: torch.nn.Module, encoded: dict[str, torch.Tensor], cfg: TrainConfig,
              checkpoint_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Standard fine-tuning of any model of the family, sliced ones included (in place; resumable from
    ``checkpoint_dir``). Returns the training statistics of :func:`toolchain.training.train`."""
    cfg = dataclasses.replace(cfg, strategy="standard")
    return train(_Whole(model), None, encoded, cfg, checkpoint_dir, progress=progress)


@torch.no_grad()
def score(model: torch.nn.Module, encoded: dict[str, torch.Tensor], spec: TaskSpec, batch_size: int = 64) -> dict:
    """The task metrics of a whole model (``score`` = the official metric, ``error`` = 1 - score)."""
    model.eval()
    inputs = {k: v for k, v in encoded.items() if k != "labels"}
    logits = torch.cat([model(**b).logits for b in batches(inputs, batch_size)]).float().numpy()
    metrics = compute_metrics(spec, logits, encoded["labels"].numpy())
    metrics["error"] = 1.0 - metrics["score"]
    return metrics


def pick(points: Iterable[dict], budget: float, *, cost: str = "latency", score: str = "error") -> dict | None:
    """The point with the lowest ``score`` among those whose ``cost`` is within ``budget`` (ties: the cheaper);
    ``None`` when none fits."""
    fits = [p for p in points if p[cost] <= budget]
    return min(fits, key=lambda p: (p[score], p[cost])) if fits else None


def front(points: Sequence[dict], objectives: Sequence[str] = ("error", "latency")) -> list[dict]:
    """The non-dominated points (pymoo's non-dominated sorting), cheapest first."""
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not points:
        return []
    F = np.array([[p[o] for o in objectives] for p in points], dtype=float)
    keep = np.atleast_1d(NonDominatedSorting().do(F, only_non_dominated_front=True))
    return sorted((points[i] for i in keep), key=lambda p: tuple(p[o] for o in reversed(objectives)))


def scored(subnets: Iterable[SubNetwork], evaluate: Callable[[SubNetwork], dict], latency) -> list[dict]:
    """``{"subnet", "latency", **evaluate(subnet)}`` for each sub-network."""
    return [{"subnet": s, "latency": float(latency(s)), **evaluate(s)} for s in subnets]
