"""Search spaces of Klein et al. (2024): SMALL, MEDIUM, LARGE, LAYER.

Each space has an encoding that pymoo searches (integers, or booleans for LARGE/LAYER), decodes it to the one
:class:`~toolchain.core.subnetwork.SubNetwork` value, samples uniformly, knows its largest and smallest member, and
counts parameters exactly (equal to ``sum(p.numel())`` of the sliced model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from toolchain.core.modeling import ModelDims
from toolchain.core.subnetwork import SubNetwork, subnetwork_from_masks

SPACE_NAMES = ("small", "medium", "large", "layer")


def layer_parameters(hidden: int, head_size: int, heads: int, units: int) -> int:
    """Parameters of one encoder layer keeping ``heads`` heads and ``units`` FFN units (0/0 = dropped)."""
    if heads == 0 and units == 0:
        return 0
    w = heads * head_size
    attention = 3 * (hidden * w + w) + (w * hidden + hidden) + 2 * hidden  # Q,K,V + output dense + LayerNorm
    ffn = (hidden * units + units) + (units * hidden + hidden) + 2 * hidden
    return attention + ffn


def fixed_parameters(model) -> int:
    """Parameters outside the encoder layers (embeddings, pooler, classifier) of a full HF classifier."""
    d = ModelDims.from_config(model.config)
    total = sum(p.numel() for p in model.parameters())
    return total - d.num_layers * layer_parameters(d.hidden_size, d.head_size, d.num_heads, d.intermediate_size)


class SearchSpace(ABC):
    name: str = ""
    vtype: type = int  # int or bool

    def __init__(self, dims: ModelDims, fixed_params: int = 0):
        self.dims = dims
        self.fixed_params = int(fixed_params)

    # encoding ------------------------------------------------------------
    @property
    @abstractmethod
    def n_var(self) -> int: ...

    @property
    @abstractmethod
    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def decode(self, x) -> SubNetwork: ...

    @abstractmethod
    def encode(self, subnet: SubNetwork) -> np.ndarray: ...

    # members -------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> SubNetwork:
        """A uniformly random member (uniform over the encoding)."""
        lo, hi = self.bounds
        if self.vtype is bool:
            return self.decode(rng.random(self.n_var) < 0.5)
        return self.decode(rng.integers(lo, hi + 1))

    def largest(self) -> SubNetwork:
        return self.decode(self.bounds[1])

    def smallest(self) -> SubNetwork:
        return self.decode(self.bounds[0])

    def num_parameters(self, subnet: SubNetwork) -> int:
        d = self.dims
        return self.fixed_params + sum(
            layer_parameters(d.hidden_size, d.head_size, h, u) for h, u in zip(subnet.heads, subnet.units)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_var={self.n_var})"


class SmallSpace(SearchSpace):
    """One number each: layers kept (the first L), heads per layer, FFN units per layer."""

    name = "small"

    @property
    def n_var(self) -> int:
        return 3

    @property
    def bounds(self):
        d = self.dims
        return np.array([1, 1, 1]), np.array([d.num_layers, d.num_heads, d.intermediate_size])

    def decode(self, x) -> SubNetwork:
        n_layers, h, u = (int(round(v)) for v in x)
        n = self.dims.num_layers
        return SubNetwork(heads=(h,) * n_layers + (0,) * (n - n_layers), units=(u,) * n_layers + (0,) * (n - n_layers))

    def encode(self, subnet: SubNetwork) -> np.ndarray:
        kept = subnet.kept_layers
        if kept != tuple(range(len(kept))) or len({subnet.heads[i] for i in kept}) > 1 or len({subnet.units[i] for i in kept}) > 1:
            raise ValueError(f"{subnet} is not a member of the SMALL space")
        if not kept:
            raise ValueError("the SMALL space keeps at least one layer")
        return np.array([len(kept), subnet.heads[0], subnet.units[0]])


class MediumSpace(SearchSpace):
    """Heads and FFN units per layer (the first k of each, i.e. the most important after re-ordering)."""

    name = "medium"

    @property
    def n_var(self) -> int:
        return 2 * self.dims.num_layers

    @property
    def bounds(self):
        d = self.dims
        return np.zeros(self.n_var, dtype=int), np.array([d.num_heads] * d.num_layers + [d.intermediate_size] * d.num_layers)

    def decode(self, x) -> SubNetwork:
        x = [int(round(v)) for v in x]
        n = self.dims.num_layers
        return SubNetwork(heads=tuple(x[:n]), units=tuple(x[n:]))

    def encode(self, subnet: SubNetwork) -> np.ndarray:
        if not subnet.is_prefix():
            raise ValueError(f"{subnet} keeps non-leading heads/units: not a member of the MEDIUM space")
        return np.array(list(subnet.heads) + list(subnet.units))


class LargeSpace(SearchSpace):
    """A binary choice per head and per FFN unit of every layer."""

    name = "large"
    vtype = bool

    @property
    def n_var(self) -> int:
        d = self.dims
        return d.num_layers * (d.num_heads + d.intermediate_size)

    @property
    def bounds(self):
        return np.zeros(self.n_var, dtype=int), np.ones(self.n_var, dtype=int)

    def decode(self, x) -> SubNetwork:
        d = self.dims
        x = np.asarray(x).astype(bool)
        nh = d.num_layers * d.num_heads
        heads = x[:nh].reshape(d.num_layers, d.num_heads)
        units = x[nh:].reshape(d.num_layers, d.intermediate_size)
        return subnetwork_from_masks(heads, units)

    def encode(self, subnet: SubNetwork) -> np.ndarray:
        d = self.dims
        heads = np.zeros((d.num_layers, d.num_heads), dtype=bool)
        units = np.zeros((d.num_layers, d.intermediate_size), dtype=bool)
        for i in range(d.num_layers):
            heads[i, subnet.heads_of(i)] = True
            units[i, subnet.units_of(i)] = True
        return np.concatenate([heads.ravel(), units.ravel()])


class LayerSpace(SearchSpace):
    """Which layers are kept (each kept layer is complete)."""

    name = "layer"
    vtype = bool

    @property
    def n_var(self) -> int:
        return self.dims.num_layers

    @property
    def bounds(self):
        return np.zeros(self.n_var, dtype=int), np.ones(self.n_var, dtype=int)

    def decode(self, x) -> SubNetwork:
        d = self.dims
        keep = [bool(v) for v in np.asarray(x).astype(bool)]
        return SubNetwork(heads=tuple(d.num_heads if k else 0 for k in keep),
                          units=tuple(d.intermediate_size if k else 0 for k in keep))

    def encode(self, subnet: SubNetwork) -> np.ndarray:
        d = self.dims
        for h, u in zip(subnet.heads, subnet.units):
            if (h, u) not in ((0, 0), (d.num_heads, d.intermediate_size)):
                raise ValueError(f"{subnet} keeps partial layers: not a member of the LAYER space")
        return np.array([h > 0 for h in subnet.heads])


_SPACES = {c.name: c for c in (SmallSpace, MediumSpace, LargeSpace, LayerSpace)}


def make_space(name: str, dims: ModelDims, fixed_params: int = 0) -> SearchSpace:
    try:
        cls = _SPACES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown search space '{name}'; choose one of: {', '.join(SPACE_NAMES)}") from None
    return cls(dims, fixed_params)
