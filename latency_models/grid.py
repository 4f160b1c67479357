"""The profiling grid: which micro-graphs are measured, how they are built, and the process that measures them.

The micro-graphs are what the compiler really ships, cut down to one layer: a one-layer model of the family,
sliced to ``h`` heads and ``u`` FFN units and exported with :func:`toolchain.onnx.build.build_onnx` (same export,
same ONNX Runtime fusion into ``Attention`` / ``BiasGelu``, same graph form of the residual connections, same int8
quantization), plus the zero-layer model (embeddings, pooler, classifier). Weights are random: values do not change
latency.

Measuring happens in a clean worker process (:class:`Worker`: ``python latency_models/bundle_runner.py --serve``)
that forks one child per graph and measures it with :func:`targets.meter.measure`, the meter the export uses too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from targets import Target, TargetError, load_target
from targets.meter import resolved_measurement

from latency_models import assemble, bundle_runner as runner

DEFAULT_UNIT_STEP = 128
#: sequence lengths a table covers besides the target's own (those the model takes): the cross of the grid and the
#: end-to-end samples are measured at each; between two of them predictions are interpolated
DEFAULT_LENGTHS = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet():
    """ORT's optimizer and quantizer log expected warnings for every sliced graph; keep the progress bar clean."""
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def as_target(target) -> Target:
    """A :class:`Target`, or one loaded by name / TOML path."""
    return target if isinstance(target, Target) else load_target(target)


def export_graph(model, dst, precision: str, target: Target) -> Path:
    """Build ``model``'s ONNX as compile does (:func:`toolchain.onnx.build.build_onnx`) at ``target``'s batch and
    sequence length, without ORT's expected warnings."""
    from toolchain.onnx.build import build_onnx

    with _quiet():
        build_onnx(model, dst, precision, target.batch_size, target.sequence_length, use_gpu=target.uses_gpu)
    return Path(dst)


def config_for(dims, model_config=None, num_layers: int | None = None):
    """A config of the family with ``dims``' widths (from ``model_config`` when given) and ``num_layers`` layers."""
    if model_config is not None:
        cfg = copy.deepcopy(model_config)
    else:
        from transformers import AutoConfig

        kw = dict(vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, num_attention_heads=dims.num_heads,
                  intermediate_size=dims.intermediate_size, num_labels=dims.num_labels,
                  num_hidden_layers=dims.num_layers)
        if dims.model_type in ("roberta", "xlm-roberta"):
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, max_position_embeddings=514)
        cfg = AutoConfig.for_model(dims.model_type, **kw)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    return cfg


def max_positions(config) -> int | None:
    """The longest input ``config``'s model takes (positions), or ``None``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta"):
        limit -= getattr(config, "pad_token_id", 1) + 1  # RoBERTa positions start after the padding index
    return limit


def table_lengths(target: Target, config=None, lengths=DEFAULT_LENGTHS) -> list[int]:
    """The sequence lengths a table for ``target`` covers: ``lengths`` the model takes, and the target's own."""
    limit = max_positions(config) if config is not None else None
    return sorted({int(n) for n in lengths if limit is None or n <= limit} | {int(target.sequence_length)})


def check_sequence_length(config, target: Target) -> None:
    limit = max_positions(config)
    if limit is not None and target.sequence_length > limit:
        raise TargetError(f"target '{target.name}' has sequence_length {target.sequence_length}, but the model takes "
                         f"at most {limit} positions (max_position_embeddings); use a target with a shorter sequence")


def unit_grid(intermediate_size: int, unit_step: int = DEFAULT_UNIT_STEP) -> list[int]:
    if unit_step < 1:
        raise ValueError(f"unit_step must be >= 1, got {unit_step}")
    units = list(range(0, intermediate_size + 1, unit_step))
    if units[-1] != intermediate_size:
        units.append(intermediate_size)
    return units


def onnx_weight_bytes(path) -> int:
    """Bytes of all initializers of an ONNX graph (exact weight size at its precision)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


class Worker:
    """A clean measuring process (no torch imported) speaking the bundle runner's JSON-lines protocol; it measures
    each graph with :func:`targets.meter.measure` (latency: median ms; memory: MB = 10^6 bytes)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(runner.__file__).resolve()), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def measure(self, path, target: Target, vocab_size: int, measurement: dict | None = None,
                length: int | None = None) -> dict:
        """``path`` measured with ``target``'s settings, at sequence length ``length`` (default: the target's)."""
        settings = target.settings() if length is None else {**target.settings(), "sequence_length": int(length)}
        req = {"path": str(path), "target": settings, "vocab_size": vocab_size, "measurement": measurement}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the measuring worker process died")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ micro-graphs
MICRO_VOCAB = 512


def make_manifest(dims, target: Target, precision: str, unit_step: int = DEFAULT_UNIT_STEP,
                  measurement: dict | None = None, lengths=None, whole_grid: bool = False) -> dict:
    """The graphs to measure: ``base`` (zero-layer model, real vocabulary), and, when the vocabulary is larger
    than :data:`MICRO_VOCAB`, ``base_micro`` plus one-layer models with a :data:`MICRO_VOCAB`-row embedding (block
    costs are differences between graphs of the same vocabulary; a small embedding makes export 4x faster and
    does not change the encoder layer's cost).

    A layer's cost is additive in its attention (heads) and its FFN (units), so the *cross* of the grid -- the
    base graphs, every head count without FFN units, every unit count without heads, and four diagonal cells --
    gives every cell (:func:`latency_models.assemble.fill_cross`): only the cross is measured, at the target's
    sequence length (28 one-layer graphs for all-MiniLM-L6-v2 instead of 168; on the validation samples of 12 tables
    of this machine the whole grid predicted no better: ``benchmarks/bench_grid_density.py``), unless
    ``whole_grid``. With ``lengths`` (the lengths the table covers), the cross is measured at each other length as
    well (entries ``<key>@<length>`` right after their graph, the same file): exported models take any length
    (:func:`latency_models.lengths.blocks_at`)."""
    from toolchain.onnx.build import graph_form

    heads = list(range(dims.num_heads + 1))
    units = unit_grid(dims.intermediate_size, unit_step)
    micro = dims.vocab_size > MICRO_VOCAB
    vocab = "micro" if micro else "full"
    others = [n for n in (lengths or ()) if n != target.sequence_length]
    cross = assemble.cross_keys(heads, units)
    graphs = []

    def add(entry):
        graphs.append(entry)
        if entry["key"] in cross:
            graphs.extend({**entry, "key": f"{entry['key']}@{n}", "length": n, "of": entry["key"]} for n in others)

    add({"key": "base", "file": "graphs/base.onnx", "heads": 0, "units": 0, "layers": 0, "vocab": "full"})
    if micro:
        add({"key": "base_micro", "file": "graphs/base_micro.onnx", "heads": 0, "units": 0, "layers": 0,
             "vocab": "micro"})
    for h in heads:
        for u in units:
            if h or u:
                k = assemble.grid_key(h, u)
                if whole_grid or k in cross:
                    add({"key": k, "file": f"graphs/{k}.onnx", "heads": h, "units": u, "layers": 1,
                         "vocab": vocab})
    return {
        "format": "nasprune.profile_manifest", "version": 1,
        "target": target.settings(), "precision": precision, "model": dims.to_dict(),
        # token ids fed to every graph are < vocab_size: valid for both vocabularies
        "vocab_size": min(dims.vocab_size, MICRO_VOCAB), "grid": {"heads": heads, "units": units},
        "lengths": sorted({*others, target.sequence_length}), "own_grid": "whole" if whole_grid else "cross",
        "measurement": resolved_measurement(target.settings(), measurement), "graphs": graphs,
        "graph_form": graph_form(target.uses_gpu),
    }


class MicroGraphBuilder:
    """Exports the micro-graph of a manifest entry (one-layer model sliced to (h, u), or the zero-layer model)."""

    def __init__(self, dims, target: Target, precision: str, model_config=None):
        cfg = config_for(dims, model_config, num_layers=1)
        check_sequence_length(cfg, target)
        self.config = cfg  # one layer of the family: its max positions bound the lengths a table covers
        self._models: dict = {}
        self.target, self.precision = target, precision

    def model(self, vocab: str = "full"):
        if vocab not in self._models:
            import torch

            from toolchain.core.modeling import model_from_config

            cfg = copy.deepcopy(self.config)
            if vocab == "micro":
                cfg.vocab_size = min(cfg.vocab_size, MICRO_VOCAB)
            torch.manual_seed(0)
            self._models[vocab] = model_from_config(cfg).eval()
        return self._models[vocab]

    def build(self, entry: dict, dst) -> Path:
        from toolchain.core.slicing import slice_model
        from toolchain.core.subnetwork import SubNetwork

        sub = SubNetwork((entry["heads"],), (entry["units"],))
        export_graph(slice_model(self.model(entry.get("vocab", "full")), sub), dst, self.precision, self.target)
        entry["weight_bytes"] = onnx_weight_bytes(dst)
        return Path(dst)
