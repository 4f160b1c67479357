"""Do a compile's dev figures hold on data it never saw? (issue: accurate at speed; "choose by validation data").

A compile chooses on the task's dev set: which of a point and its twins is recovered to the end (the screening), which
precision of a sub-network is shipped, whether a point is within ``--max-accuracy-drop``. The dev metric it reports for
a shipped point is therefore a little optimistic. This benchmark scores a compile's shipped ONNX models and its
unpruned reference, with plain onnxruntime and each folder's own ``tokenizer.json``, on labelled examples of the
task's training split that the compile never used: neither the super-network's training subset
(``max_train_samples``) nor the recovery's texts (``recovery.examples``, seeded like the compile) nor the unused
training examples it scored its exports on besides dev (``metric.selection``), nor any example whose text is one of
theirs. It prints, per shipped point, the loss against the unpruned model on dev (as the compile
reported it) and on those held-out examples, with a paired bootstrap 95 % interval (scipy) of the held-out loss.

    python benchmarks/bench_heldout.py --compile OUT [--compile OUT2 ...] [--samples 2000] [--seed 1]
        [--min-words N] [--section NAME] [--no-docs]

``OUT``: a compile's output folder (``run.json``, ``manifest.json``, ``points/``, ``reference/unpruned``). Data:
``NASPRUNE_DATA_DIR`` as for the compile. On SST-2 the training split holds phrases of the training reviews (many
short, some parts of others), the dev split whole sentences of other reviews: the held-out examples are of the same
distribution as the training data, not as dev; a held-out phrase may be part of a training one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import docs_arguments, machine, markdown_table, publish, section_name  # noqa: E402
from toolchain.heldout import selection_examples, unused_training, words  # noqa: E402


def held_out(out: Path, n: int, seed: int, min_words: int = 0):
    """The compile's data settings, ``n`` labelled training examples (seeded) it never used, by text, of at least
    ``min_words`` words, and how many there were (:func:`toolchain.heldout.unused_training`), leaving out those the
    compile chose on (:func:`chosen_on`)."""
    from toolchain.recover import RecoverSettings
    from toolchain.run import load_run

    run = load_run(out)
    examples = {json.loads(p.read_text()).get("extra", {}).get("recovery", {}).get("examples")
                for p in out.glob("points/*/nasprune.json")} - {None}
    if len(examples) > 1:
        sys.exit(f"{out}: points recovered on different numbers of texts ({sorted(examples)})")
    seed_of_compile = json.loads((out / "run.json").read_text())["compile"]["seed"]
    recoveries = [RecoverSettings(samples=e, seed=seed_of_compile) for e in examples]
    held, n_unseen = unused_training(run, recoveries, n, seed, min_words, exclude=chosen_on(out, run, recoveries))
    return run.data, held, n_unseen


def chosen_on(out: Path, run, recoveries) -> list:
    """The unused training examples the compile scored its exports on besides dev (``metric.selection`` of its
    unpruned reference, :func:`toolchain.heldout.selection_examples`): not held out from it."""
    metric = json.loads((out / "reference" / "unpruned" / "nasprune.json").read_text()).get("metric") or {}
    drawn = metric.get("selection")
    if not drawn or not drawn.get("asked"):
        return []
    extra, _ = selection_examples(run, recoveries[0] if recoveries else None, drawn["asked"], drawn["seed"])
    return extra.texts if extra is not None else []


def predict(folder: Path, texts: list[tuple[str, ...]], max_length: int, batch: int = 32) -> np.ndarray:
    """Logits of ``folder/model.onnx`` on ``texts``: plain onnxruntime, the folder's own tokenizer, batches padded
    to their longest text (sorted by length)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    inputs = [t if len(t) > 1 else t[0] for t in texts]
    order = np.argsort([len(" ".join(t)) for t in texts], kind="stable")  # batches of similar length pad little
    out = [None] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok.encode_batch([inputs[i] for i in idx])
        feed = {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}
        logits = sess.run(None, {k: v for k, v in feed.items() if k in names})[0]
        for i, row in zip(idx, logits):
            out[i] = row
    return np.stack(out)


def paired_interval(metric_name: str, ref: np.ndarray, point: np.ndarray, labels: np.ndarray, seed: int):
    """A 95 % bootstrap interval (scipy, paired resampling of the examples) of ``metric(point) - metric(ref)``."""
    from scipy.stats import bootstrap

    from toolchain.core.data import compute_metrics

    def loss(i):
        i = i.astype(int)
        return (compute_metrics(metric_name, point[i], labels[i])["score"]
                - compute_metrics(metric_name, ref[i], labels[i])["score"])

    res = bootstrap((np.arange(len(labels)),), loss, n_resamples=1000, vectorized=False, method="percentile",
                    random_state=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


def label(out: Path) -> str:
    """A compile's name in the table: its folder's last two parts (``out`` alone names nothing)."""
    return "/".join(out.parts[-2:])


def score_compile(out: Path, n: int, seed: int, min_words: int = 0, rejected: bool = False) -> tuple[list[dict], dict]:
    """The unpruned reference and every shipped point (``rejected``: every exported one) of the compile ``out``, each
    with its dev metric and loss (as
    the compile reported them), its held-out metric and loss with the loss's 95 % interval, and its drift-corrected
    speed-up; and what the held-out examples were."""
    from toolchain.core.data import compute_metrics

    manifest = json.loads((out / "manifest.json").read_text())
    unpruned = manifest["settings"]["unpruned"]
    data, held, n_unseen = held_out(out, n, seed, min_words)
    metric_name = next(p["metric_name"] for p in manifest["points"])
    ref_logits = predict(out / unpruned["path"], held.texts, data.max_length)
    ref_score = compute_metrics(metric_name, ref_logits, held.labels)["score"]
    speed = unpruned.get("measured_latency_drift_corrected_ms") or unpruned["measured_latency_ms"]
    ref = {"dev": unpruned.get("metric_dev", unpruned["metric"]), "chosen": unpruned["metric"]}
    scored = [{"id": "unpruned", "precision": "fp32", "speedup": 1.0, **ref, "held": ref_score}]
    for p in manifest["points"]:
        if not (p["feasible"] or rejected):
            continue
        logits = predict(out / p["path"], held.texts, data.max_length)
        score = compute_metrics(metric_name, logits, held.labels)["score"]
        lat = p.get("measured_latency_drift_corrected_ms") or p["measured_latency_ms"]
        dev = p.get("metric_dev", p["metric"])
        scored.append({"id": p["id"] + ("" if p["feasible"] else " (not shipped)"), "precision": p["precision"],
                       "speedup": speed / lat, "dev": dev,
                       "dev_loss": dev - ref["dev"], "chosen_loss": p["metric"] - ref["chosen"], "held": score,
                       "held_loss": score - ref_score,
                       "interval": paired_interval(metric_name, ref_logits, logits, held.labels, seed)})
    lengths = [words(t) for t in held.texts]
    dev_lengths = [words(t) for t in data.load("validation").texts]
    about = {"task": data.task or data.train_file, "metric": metric_name, "unseen": n_unseen, "n": len(held),
             "words": float(np.median(lengths)), "dev_words": float(np.median(dev_lengths))}
    return scored, about


def compile_rows(out: Path, n: int, seed: int, min_words: int = 0, rejected: bool = False) -> tuple[list[list], dict]:
    """:func:`score_compile` as rows of the table."""
    scored, about = score_compile(out, n, seed, min_words, rejected)
    rows = []
    for p in scored:
        if p["id"] == "unpruned":
            rows.append([label(out), "unpruned fp32", "1.00x", f"{p['dev']:.4f}", "", "", f"{p['held']:.4f}", "",
                         ""])
            continue
        low, high = p["interval"]
        rows.append([label(out), f"{p['id']} {p['precision']}", f"{p['speedup']:.2f}x", f"{p['dev']:.4f}",
                     f"{100 * p['dev_loss']:+.1f}", f"{100 * p['chosen_loss']:+.1f}", f"{p['held']:.4f}",
                     f"{100 * p['held_loss']:+.1f}",
                     f"[{100 * low:+.1f}, {100 * high:+.1f}]"])
    return rows, about


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="append", required=True, help="a compile's output folder (repeatable)")
    ap.add_argument("--samples", type=int, default=2000, help="held-out examples scored per compile")
    ap.add_argument("--seed", type=int, default=1, help="seed of the held-out draw and of the bootstrap")
    ap.add_argument("--min-words", type=int, default=0, help="only held-out examples of at least this many words "
                    "(SST-2's training phrases are shorter than its dev sentences)")
    ap.add_argument("--rejected", action="store_true", help="the exported points that were not shipped too (marked)")
    docs_arguments(ap, "bench_heldout")
    args = ap.parse_args()
    rows, abouts = [], []
    longer = f" of at least {args.min_words} words" if args.min_words else ""
    for c in args.compile:
        try:
            r, about = compile_rows(Path(c), args.samples, args.seed, args.min_words, args.rejected)
        except ValueError as e:  # too few training examples left unused (a small task)
            sys.exit(f"{c}: {e}")
        rows += r
        abouts.append(f"`{label(Path(c))}`: {about['task']}, {about['metric']}, {about['n']} of the {about['unseen']} "
                      f"training examples{longer} the compile never used (median {about['words']:g} words; dev "
                      f"{about['dev_words']:g})")
    command = " ".join(["python benchmarks/bench_heldout.py", *(f"--compile {label(Path(c))}" for c in args.compile),
                        f"--samples {args.samples} --seed {args.seed}",
                        *([f"--min-words {args.min_words}"] if args.min_words else []),
                        *(["--rejected"] if args.rejected else [])])
    lines = [f"Command: `{command}` (compile output folders). Machine: {machine()}.", "",
             "Each compile's shipped ONNX models and its unpruned reference, scored with plain onnxruntime on "
             "labelled examples of the task's training split that the compile never used (neither the "
             "super-network's training subset, the recovery's texts, nor the examples it chose on besides dev); "
             "loss in points against the unpruned model on dev and on what the compile chose on (dev and unused "
             "training examples, toolchain.heldout; the same as dev for a compile before it), as the compile "
             "reported them, and on those held-out examples, with a paired bootstrap 95 % interval (1000 "
             "resamples). Speed-up: measured by the compile, drift-corrected.", "",
             *[f"- {a}" for a in abouts], "",
             *markdown_table(["compile", "point", "speed-up", "dev", "dev loss", "chosen-on loss", "held-out",
                              "held-out loss", "95 % interval"], rows, right={2, 3, 4, 5, 6, 7})]
    publish(section_name("bench_heldout", args.section), lines, write=not args.no_docs)


if __name__ == "__main__":
    main()
