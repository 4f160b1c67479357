"""Baselines of the evidence benchmark (layer dropping, uniform ratio, fine-tuning a whole model) and the held-out
search split."""

from __future__ import annotations

import pytest
import torch

from toolchain.core.subnetwork import layer_drop_subnet, uniform_subnet
from toolchain.evaluation import score_model as score
from toolchain.search import best_under as pick, non_dominated
from toolchain.training import fine_tune
from toolchain.core.data import TASKS
from toolchain.core.modeling import ModelDims, model_from_config, tiny_config
from toolchain.run import DataSettings, RunError
from toolchain.core.search_space import fixed_parameters, make_space
from toolchain.core.slicing import slice_model
from toolchain.core.subnetwork import SubNetwork
from toolchain.training import TrainConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return model_from_config(tiny_config())


def _encoded(n=64, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(5, 128, (n, seq), generator=g)
    ids[:, 1] = 3 + labels  # a learnable signal
    return {"input_ids": ids, "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "token_type_ids": torch.zeros(n, seq, dtype=torch.long), "labels": labels}


def test_layer_drop_and_uniform_subnets(model):
    dims = ModelDims.from_config(model.config)  # 3 layers, 4 heads, 48 units
    assert layer_drop_subnet(dims, 2) == SubNetwork((4, 4, 0), (48, 48, 0))
    assert layer_drop_subnet(dims, 2).kept_layers == (0, 1)
    assert uniform_subnet(dims, 0.5) == SubNetwork((2, 2, 2), (24, 24, 24))
    assert uniform_subnet(dims, 0.01) == SubNetwork((1, 1, 1), (1, 1, 1))
    assert uniform_subnet(dims, 1.0) == SubNetwork.full(3, 4, 48)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="k must be"):
            layer_drop_subnet(dims, bad)
    with pytest.raises(ValueError, match="ratio"):
        uniform_subnet(dims, 0.0)
    space = make_space("medium", dims, fixed_parameters(model))
    assert space.num_parameters(layer_drop_subnet(dims, 2)) == sum(
        p.numel() for p in slice_model(model, layer_drop_subnet(dims, 2)).parameters())


@pytest.mark.parametrize("subnet", [SubNetwork((4, 4, 0), (48, 48, 0)), SubNetwork((1, 0, 3), (10, 7, 0))])
def test_fine_tune_trains_a_sliced_model(model, subnet):
    """Layers without heads or units (no attention block to hook) train too; the loss goes down."""
    sliced = slice_model(model, subnet)
    enc = _encoded()
    before = score(sliced, enc, TASKS["sst2"])
    params = {k: v.clone() for k, v in sliced.state_dict().items()}
    stats = fine_tune(sliced, enc, TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3), progress=False)
    assert stats["steps"] == 32
    changed = [k for k, v in sliced.state_dict().items() if not torch.equal(params[k], v)]
    assert "classifier.weight" in changed and any("layer.0" in k for k in changed)
    after = score(sliced, enc, TASKS["sst2"])
    assert after["error"] < before["error"]
    assert after["error"] == pytest.approx(1 - after["score"])


def test_pick_and_front():
    pts = [{"error": 0.1, "latency": 10.0}, {"error": 0.2, "latency": 5.0}, {"error": 0.3, "latency": 6.0},
           {"error": 0.25, "latency": 2.0}]
    assert pick(pts, 6.0) == pts[1]
    assert pick(pts, 100) == pts[0]
    assert pick(pts, 1.0) is None
    assert non_dominated(pts, ("error", "latency")) == [pts[0], pts[1], pts[3]]
    assert non_dominated([], ("error", "latency")) == []


def _write(path, n):
    path.write_text("sentence\tlabel\n" + "".join(f"text number {i}\t{i % 2}\n" for i in range(n)))
    return str(path)


def test_holdout_split_is_disjoint_seeded_and_excluded_from_training(tmp_path):
    train = _write(tmp_path / "train.tsv", 100)
    val = _write(tmp_path / "dev.tsv", 10)
    d = DataSettings(train_file=train, validation_file=val, holdout=0.2, max_train_samples=50, seed=3)
    held, rest = d.load("holdout"), d.load("train")
    assert len(held) == 20 and len(rest) == 50
    assert not set(held.texts) & set(rest.texts)
    again = DataSettings(train_file=train, validation_file=val, holdout=0.2, seed=3)
    assert again.load("holdout").texts == held.texts  # the same seed, the same held-out part
    assert len(again.load("train")) == 80
    assert DataSettings(train_file=train, validation_file=val, holdout=0.2, seed=4).load("holdout").texts != held.texts
    assert len(d.load("validation")) == 10
    assert "holdout" in d.to_dict() and "holdout" not in DataSettings().to_dict()  # old run.json keys unchanged
    with pytest.raises(RunError, match="holdout"):
        DataSettings(train_file=train, validation_file=val).load("holdout")
