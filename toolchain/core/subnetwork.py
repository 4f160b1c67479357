"""The one sub-network value every search space decodes to (see DESIGN.md, "A sub-network").

A sub-network says, per encoder layer, how many attention heads and FFN units it keeps. By default the kept
heads/units are the *first* k of the layer (after importance re-ordering these are the most important ones). The
LARGE search space chooses arbitrary heads/units; it records their indices in ``head_index`` / ``unit_index``.

A layer with 0 heads and 0 units is dropped (identity). A layer with 0 heads but some units keeps its attention
block as ``LayerNorm(x + b_out)`` (what a zero-width attention computes); likewise for 0 units.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class SubNetwork:
    heads: tuple[int, ...]
    units: tuple[int, ...]
    head_index: tuple[tuple[int, ...], ...] | None = field(default=None)
    unit_index: tuple[tuple[int, ...], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        if len(self.heads) != len(self.units):
            raise ValueError(f"heads ({len(self.heads)} layers) and units ({len(self.units)} layers) differ in length")
        if any(h < 0 for h in self.heads) or any(u < 0 for u in self.units):
            raise ValueError("head and unit counts must be >= 0")
        for name, idx, counts in (("head_index", self.head_index, self.heads), ("unit_index", self.unit_index, self.units)):
            if idx is None:
                continue
            idx = tuple(tuple(sorted(int(i) for i in row)) for row in idx)
            object.__setattr__(self, name, idx)
            if len(idx) != len(counts) or any(len(r) != c for r, c in zip(idx, counts)):
                raise ValueError(f"{name} does not match the per-layer counts")

    # ------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Indices of layers that are not dropped."""
        return tuple(i for i, (h, u) in enumerate(zip(self.heads, self.units)) if h > 0 or u > 0)

    def heads_of(self, layer: int) -> list[int]:
        """Indices of the kept heads of ``layer``."""
        if self.head_index is not None:
            return list(self.head_index[layer])
        return list(range(self.heads[layer]))

    def units_of(self, layer: int) -> list[int]:
        if self.unit_index is not None:
            return list(self.unit_index[layer])
        return list(range(self.units[layer]))

    def is_prefix(self) -> bool:
        """True if every layer keeps its first k heads and units."""
        return all(self.heads_of(i) == list(range(self.heads[i])) for i in range(self.num_layers)) and all(
            self.units_of(i) == list(range(self.units[i])) for i in range(self.num_layers)
        )

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d: dict = {"heads": list(self.heads), "units": list(self.units)}
        if self.head_index is not None and not all(
            list(r) == list(range(c)) for r, c in zip(self.head_index, self.heads)
        ):
            d["head_index"] = [list(r) for r in self.head_index]
        if self.unit_index is not None and not all(
            list(r) == list(range(c)) for r, c in zip(self.unit_index, self.units)
        ):
            d["unit_index"] = [list(r) for r in self.unit_index]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SubNetwork":
        if not isinstance(d, dict) or "heads" not in d or "units" not in d:
            raise ValueError('a sub-network is a JSON object with "heads" and "units" lists (one entry per layer)')
        return cls(
            heads=tuple(d["heads"]),
            units=tuple(d["units"]),
            head_index=tuple(tuple(r) for r in d["head_index"]) if d.get("head_index") is not None else None,
            unit_index=tuple(tuple(r) for r in d["unit_index"]) if d.get("unit_index") is not None else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "SubNetwork":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"sub-network is not valid JSON: {e}") from None

    def key(self) -> str:
        """A short stable id (cache key, folder name)."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def full(cls, num_layers: int, num_heads: int, intermediate_size: int) -> "SubNetwork":
        return cls(heads=(num_heads,) * num_layers, units=(intermediate_size,) * num_layers)

    def validate_for(self, num_layers: int, num_heads: int, intermediate_size: int) -> None:
        if self.num_layers != num_layers:
            raise ValueError(f"sub-network has {self.num_layers} layers, the model has {num_layers}")
        if max(self.heads, default=0) > num_heads or max(self.units, default=0) > intermediate_size:
            raise ValueError(
                f"sub-network asks for more than the model has ({num_heads} heads, {intermediate_size} units per layer)"
            )
        for idx, top in ((self.head_index, num_heads), (self.unit_index, intermediate_size)):
            if idx is not None and any(i >= top for row in idx for i in row):
                raise ValueError("sub-network index out of range for this model")

    def __str__(self) -> str:
        return f"SubNetwork(heads={list(self.heads)}, units={list(self.units)})"


def subnetwork_from_masks(head_masks: Sequence[Sequence[int]], unit_masks: Sequence[Sequence[int]]) -> SubNetwork:
    """Binary per-head / per-unit masks (LARGE space) -> SubNetwork with explicit indices."""
    hi = tuple(tuple(i for i, m in enumerate(row) if m) for row in head_masks)
    ui = tuple(tuple(i for i, m in enumerate(row) if m) for row in unit_masks)
    return SubNetwork(heads=tuple(len(r) for r in hi), units=tuple(len(r) for r in ui), head_index=hi, unit_index=ui)


def layer_drop_subnet(dims, k: int) -> SubNetwork:
    """The first ``k`` encoder layers of a network of ``dims`` (:class:`~toolchain.core.modeling.ModelDims`) at full
    width, the others dropped."""
    if not 1 <= k <= dims.num_layers:
        raise ValueError(f"k must be in [1, {dims.num_layers}], got {k}")
    n = dims.num_layers
    return SubNetwork(tuple(dims.num_heads if i < k else 0 for i in range(n)),
                      tuple(dims.intermediate_size if i < k else 0 for i in range(n)))


def uniform_subnet(dims, ratio: float) -> SubNetwork:
    """``ratio`` of the heads and of the FFN units (rounded, at least one of each) in every layer."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    h = max(1, round(ratio * dims.num_heads))
    u = max(1, round(ratio * dims.intermediate_size))
    return SubNetwork((h,) * dims.num_layers, (u,) * dims.num_layers)
