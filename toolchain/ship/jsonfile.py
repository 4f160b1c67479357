"""The JSON files an export writes (``nasprune.json``, ``manifest.json``): written atomically by the one writer
(:func:`toolchain.core.atomic.write_json_atomic`, re-exported here), with the versions of the software that wrote
them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import onnx
import onnxruntime
import torch
import transformers

from toolchain.core.atomic import write_json_atomic

__all__ = ["versions", "write_json_atomic"]


def versions() -> dict:
    """The versions of ONNX Runtime, ONNX, torch, transformers and nasprune (``None`` where not installed)."""
    out = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        out["nasprune"] = version("nasprune")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        out["nasprune"] = None
    return out
