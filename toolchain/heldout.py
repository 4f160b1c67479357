"""Labelled examples a compile never trained on, beyond the dev set.

The export stage chooses among its exported models (precision, the Pareto cut, an accuracy limit) by their metric,
and on dev alone that choice is a coin toss between close points: SST-2's 872 dev sentences measure an accuracy to
about +-1 point, and the best of several candidates on them is over-rated by about that much. In one default
compile the unpruned network in int8 read 0.5 points below the unpruned fp32 model on dev and was dropped as
dominated by a pruned point reading 0.3 above it; on 3,000 unused training sentences the int8 one was level with
fp32 and the pruned point 1.4 below (docs/benchmarks.md ``bench_heldout-dev-only-choice``). So the export scores
every model on dev plus :func:`selection_examples`, training examples that neither the super-network's training
subset nor the recovery texts contain (:func:`selection_data`), and reports dev alone beside it. Benchmarks check
shipped points on yet other unused examples (:func:`unused_training` with ``exclude``: benchmarks/bench_heldout.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from toolchain.core.data import TextDataset
from toolchain.ship.verify import MetricData

#: names of the parts of :func:`selection_data` (``metric["parts"]`` of an exported point)
DEV, UNUSED = "dev", "unused training"
#: the selection examples are at least as long (words) as this quantile of the dev texts, so that they are more like
#: dev: SST-2's training split is mostly short phrases (median 7 words; dev sentences 19)
MIN_WORDS_QUANTILE = 25
#: the random stream of the selection's draw (:func:`unused_training`), apart from the benchmarks' draws
SELECTION_STREAM = 19


def words(text: tuple[str, ...]) -> int:
    return len(" ".join(text).split())


def unused_training(run, recoveries, n: int | None, seed: int, min_words: int = 0, exclude=(),
                    strict: bool = True, stream: int = 17) -> tuple[TextDataset, int]:
    """``n`` labelled examples (seeded draw; ``None``: all) of ``run``'s training split that neither its
    super-network's training subset nor any of ``recoveries`` (``RecoverSettings``) used, by text, nor ``exclude``
    (texts), of at least ``min_words`` words; and how many such examples there were. Fewer than ``n``: a
    ``ValueError`` when ``strict``, else all there are. ``stream`` tells draws of one seed apart."""
    from toolchain.recover import recovery_data

    used = set(run.data.load("train").texts) | set(exclude)
    for settings in recoveries:
        used |= set(recovery_data(run, settings).texts)
    full = replace(run.data, max_train_samples=None).load("train")
    unseen = [i for i, t in enumerate(full.texts) if t not in used and words(t) >= min_words]
    if n is not None and len(unseen) < n and strict:
        raise ValueError(f"only {len(unseen)} training examples unused by the run, {n} asked")
    order = np.random.default_rng([seed, stream]).permutation(unseen)
    return full.subset(np.sort(order[:n] if n is not None else order)), len(unseen)


def selection_examples(run, recover, n: int, seed: int) -> tuple[TextDataset | None, int]:
    """Up to ``n`` unused training examples (:func:`unused_training`, seeded by ``seed``; ``recover``: the
    recovery's ``RecoverSettings``, ``None`` without recovery) at least as long as the shorter quarter of dev
    (:data:`MIN_WORDS_QUANTILE`), and that least number of words; ``None`` when ``n`` is 0 or the task has none
    left (a small task whose training split the recovery used whole)."""
    dev = run.data.load("validation")
    min_words = int(np.percentile([words(t) for t in dev.texts], MIN_WORDS_QUANTILE)) if len(dev) else 0
    if not n:
        return None, min_words
    held, _ = unused_training(run, [recover] if recover is not None else [], n, seed, min_words, strict=False,
                              stream=SELECTION_STREAM)
    return (held if len(held) else None), min_words


def selection_data(run, recover, n: int, seed: int) -> tuple[TextDataset, dict]:
    """Dev, then :func:`selection_examples`, as one dataset; and what it is: ``parts`` (``{name: [start, stop)}``
    of its rows; only ``dev`` when there are no selection examples) and the draw (``asked``, ``seed``,
    ``min_words``), so that a benchmark can leave the same examples out."""
    dev = run.data.load("validation")
    extra, min_words = selection_examples(run, recover, n, seed)
    info = {"asked": int(n or 0), "seed": int(seed), "min_words": min_words, "parts": {DEV: [0, len(dev)]}}
    if extra is None:
        return dev, info
    both = TextDataset(dev.texts + extra.texts, np.concatenate([dev.labels, extra.labels]), dev.spec,
                       f"{dev.source} + {len(extra)} unused training examples")
    info["parts"][UNUSED] = [len(dev), len(both)]
    return both, info


def selection_metric(run, recover, n: int, seed: int) -> MetricData:
    """:func:`selection_data` tokenized at the run's ``max_length``, to score exported models on: their metric on
    it all, and on each part (``metric["parts"]``, :func:`toolchain.ship.verify.evaluate_onnx`)."""
    data, info = selection_data(run, recover, n, seed)
    scored = MetricData.from_dataset(data, run.tokenizer, run.data.max_length)
    scored.extra["selection"] = info
    return scored
