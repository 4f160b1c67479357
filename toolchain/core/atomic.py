"""Files written whole or not at all: :func:`write_atomic` (any writer) and :func:`write_json_atomic` (the one JSON
writer of every run file: ``run.json``, ``pareto.json``, ``rfp.json``, ``nasprune.json``, ``manifest.json``, ...).

The content goes to a temporary sibling first and is renamed over ``path`` (``os.replace``, atomic on POSIX and
Windows), so a reader -- or a run resumed after a kill -- never sees half a file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.core.subnetwork import SubNetwork


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it to ``path`` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def jsonable(obj):
    """``obj`` with sub-networks, paths and numpy scalars as JSON values; NaN / inf become ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, SubNetwork):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, data, indent: int | None = 2) -> Path:
    """Write ``data`` (:func:`jsonable` values; other numbers through ``float``) to ``path`` atomically."""
    text = json.dumps(jsonable(data), indent=indent, default=float) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
