"""Evaluate any sub-network on a validation set with the shared weights, batched, cached by sub-network.

Two ways to run a candidate, with identical results (tests check it): ``mask`` runs the super-network with masks;
``slice`` materialises the smaller model first, which costs a copy of the weights but runs only the kept widths.
``auto`` slices when the candidate keeps less than ``slice_below`` (0.95) of the full network's parameters: the
crossover measured by ``benchmarks/bench_search.py`` (MiniLM on SST-2, 300 dev sentences, 2 cores: slicing took
0.41x the masked time at 68 % of the parameters, 0.73x at 85 %, 1.10x for the full network; docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from toolchain.core.data import TaskSpec, batches, compute_metrics
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork

log = logging.getLogger(__name__)


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX), where autocast pays off;
    elsewhere it emulates them, slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: what an evaluation's ``dtype`` may be (``auto``: :func:`resolve_dtype`)
DTYPES = ("auto", "fp32", "bf16")


def resolve_dtype(dtype: str) -> str:
    """``auto``: ``bf16`` where :func:`bf16_supported`, else ``fp32``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")
    return ("bf16" if bf16_supported() else "fp32") if dtype == "auto" else dtype


class Evaluator:
    def __init__(self, supernet: SuperNetwork, encoded: dict[str, torch.Tensor], spec: TaskSpec,
                 batch_size: int = 64, mode: str = "auto", slice_below: float = 0.95, param_count=None,
                 store: str | Path | None = None, dtype: str = "fp32"):
        """``store``: a JSON-lines file of earlier results on the same weights and data (see
        ``Run.evaluation_store``); they are reused, and new ones are appended as they are computed. ``dtype``
        ``bf16``: forward passes under bfloat16 autocast (:func:`resolve_dtype`; the store should then be one of
        bf16 results)."""
        if mode not in ("auto", "mask", "slice"):
            raise ValueError("mode must be auto, mask or slice")
        self.supernet, self.spec, self.batch_size, self.mode = supernet, spec, batch_size, mode
        self.dtype = resolve_dtype(dtype)
        self.slice_below, self.param_count = slice_below, param_count
        # sort by length once: batches then pad little (dynamic padding in data.batches)
        order = torch.argsort(encoded["attention_mask"].sum(1))
        self.encoded = {k: v[order] for k, v in encoded.items()}
        self.labels = self.encoded["labels"].numpy()
        self.cache: dict[str, dict] = {}
        self.subnets: dict[str, SubNetwork] = {}  # key -> sub-network, where the store says which one it was
        self.cost: dict[str, float] = {}  # seconds the first (uncached) evaluation of each key took
        self.seconds = 0.0
        self.calls = 0
        self.store = Path(store) if store is not None else None
        if self.store is not None and self.store.is_file():
            self._load_store()

    def __getstate__(self) -> dict:
        """A copy sent to another process (a Ray worker) keeps the cache but never writes the store: only the
        process that owns the store (the driver) appends to it, through :meth:`remember`."""
        state = dict(self.__dict__)
        state["store"] = None
        return state

    def _load_store(self) -> None:
        n = len(self.labels)
        for i, line in enumerate(self.store.read_text().splitlines()):
            try:
                row = json.loads(line)
                if row["n"] == n:
                    self.cache[row["key"]], self.cost[row["key"]] = dict(row["metrics"]), float(row["seconds"])
                    if "subnet" in row:
                        self.subnets[row["key"]] = SubNetwork.from_dict(row["subnet"])
            except (ValueError, KeyError, TypeError):  # e.g. the last line of an interrupted run
                log.warning("%s, line %d: unreadable, ignored", self.store, i + 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _use_slice(self, subnet: SubNetwork) -> bool:
        if self.mode != "auto":
            return self.mode == "slice"
        if self.param_count is None:
            return False
        return self.param_count(subnet) < self.slice_below * self.param_count(self.supernet.full())

    @torch.no_grad()
    def logits(self, subnet: SubNetwork | None, mode: str | None = None) -> np.ndarray:
        subnet = subnet or self.supernet.full()
        use_slice = (mode == "slice") if mode else self._use_slice(subnet)
        inputs = {k: v for k, v in self.encoded.items() if k != "labels"}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            if use_slice:
                model = self.supernet.slice(subnet)
                out = [model(**b).logits for b in batches(inputs, self.batch_size)]
            else:
                self.supernet.model.eval()
                with self.supernet.use(subnet) as model:
                    out = [model(**b).logits for b in batches(inputs, self.batch_size)]
        return torch.cat(out).float().numpy()

    def __call__(self, subnet: SubNetwork | None = None) -> dict[str, float]:
        """Task metrics of ``subnet`` (``score`` = the official metric, ``error`` = 1 - score)."""
        subnet = subnet or self.supernet.full()
        key = subnet.key()
        if key not in self.cache:
            t = time.perf_counter()
            metrics = compute_metrics(self.spec, self.logits(subnet), self.labels)
            metrics["error"] = 1.0 - metrics["score"]
            self.remember(key, metrics, time.perf_counter() - t, subnet)
            self.seconds += self.cost[key]
            self.calls += 1
        return dict(self.cache[key])

    def remember(self, key: str, metrics: dict, seconds: float, subnet: SubNetwork | None = None) -> None:
        """Cache the metrics of sub-network ``key`` (computed here, or by a copy of this evaluator in a worker) and
        append them to the store (with the sub-network itself, so later compiles can reconsider it)."""
        self.cache[key], self.cost[key] = dict(metrics), float(seconds)
        if subnet is not None:
            self.subnets[key] = subnet
        if self.store is not None:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            with open(self.store, "a+b") as f:  # one line per write: concurrent compiles append safely
                f.seek(0, 2)
                if f.tell():  # after an interrupted write, start a new line
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                row = {"key": key, "n": len(self.labels), "metrics": metrics, "seconds": float(seconds)}
                if subnet is not None:
                    row["subnet"] = subnet.to_dict()
                f.write(json.dumps(row, default=float).encode() + b"\n")

    def known(self) -> list[tuple[SubNetwork, dict]]:
        """Every sub-network scored on these weights and data that this evaluator knows by value (this run's and
        earlier runs' through the store), with its metrics."""
        return [(s, dict(self.cache[k])) for k, s in self.subnets.items() if k in self.cache]


class SearchObjective:
    """What the search scores a sub-network by: the error with the shared weights (an :class:`Evaluator`) plus
    ``cost(subnet)`` (predicted latency and memory, parameters). Picklable, so that an executor can ship it to
    workers (:mod:`toolchain.search.executors`): each worker holds its own copy of the evaluator, which never writes the
    store; the driver records what the workers computed with :meth:`remember`."""

    def __init__(self, evaluator: Evaluator, cost):
        self.evaluator, self.cost = evaluator, cost

    def __call__(self, subnet: SubNetwork) -> dict[str, float]:
        return {"error": self.evaluator(subnet)["error"], **self.cost(subnet)}

    def cached(self, subnet: SubNetwork) -> dict[str, float] | None:
        """The values without running the network, when the evaluator has this sub-network's metrics."""
        return self(subnet) if subnet.key() in self.evaluator.cache else None

    def remember(self, record: dict) -> None:
        """Driver side, for a candidate a worker evaluated: cache and store its error (and score = 1 - error)."""
        key = record["key"]
        if key not in self.evaluator.cache:
            self.evaluator.remember(key, {"score": 1.0 - record["error"], "error": record["error"]},
                                    record.get("eval_seconds", 0.0), record.get("subnet"))


@torch.no_grad()
def score_model(model: torch.nn.Module, encoded: dict[str, torch.Tensor], spec: TaskSpec, batch_size: int = 64) -> dict:
    """The task metrics of a whole model (``score`` = the official metric, ``error`` = 1 - score)."""
    model.eval()
    inputs = {k: v for k, v in encoded.items() if k != "labels"}
    logits = torch.cat([model(**b).logits for b in batches(inputs, batch_size)]).float().numpy()
    metrics = compute_metrics(spec, logits, encoded["labels"].numpy())
    metrics["error"] = 1.0 - metrics["score"]
    return metrics
