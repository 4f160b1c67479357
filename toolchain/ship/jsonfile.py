"""The JSON files an export writes (``nasprune.json``, ``manifest.json``): written atomically, with JSON-safe values
and the versions of the software that wrote them."""

from __future__ import annotations

import json
import os
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from toolchain.core.subnetwork import SubNetwork


def versions() -> dict:
    """The versions of ONNX Runtime, ONNX, torch, transformers and nasprune (``None`` where not installed)."""
    out = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        out["nasprune"] = version("nasprune")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        out["nasprune"] = None
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, SubNetwork):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, data) -> Path:
    """Write ``data`` (sub-networks, paths, numpy scalars allowed; NaN/inf become null) to ``path`` through a
    temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path
