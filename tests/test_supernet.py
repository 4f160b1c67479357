"""Search spaces, masked vs sliced forward, exact parameter counts, re-ordering, save/load of sliced models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.core.modeling import ModelDims, model_from_config, tiny_config
from toolchain.core.search_space import SPACE_NAMES, fixed_parameters, make_space
from toolchain.core.slicing import load_sliced, save_sliced
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork


def _inputs(vocab: int = 128):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padded rows
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=["bert", "roberta"])
def supernet(request):
    torch.manual_seed(0)
    return SuperNetwork(model_from_config(tiny_config(request.param)).eval())


def _members(space, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("space_name", SPACE_NAMES)
def test_sample_decode_params_and_masked_equals_sliced(supernet, space_name):
    space = make_space(space_name, supernet.dims, fixed_parameters(supernet.model))
    inputs = _inputs()
    for subnet in _members(space):
        x = space.encode(subnet)
        assert space.decode(x) == subnet
        lo, hi = space.bounds
        assert np.all(x >= lo) and np.all(x <= hi)
        sliced = supernet.slice(subnet)
        assert sum(p.numel() for p in sliced.parameters()) == space.num_parameters(subnet)
        with torch.no_grad():
            masked = supernet(subnet, **inputs).logits
            physical = sliced(**inputs).logits
        assert torch.allclose(masked, physical, atol=1e-5), (masked - physical).abs().max()


def test_largest_is_full_network_and_matches_plain_model(supernet):
    inputs = _inputs()
    space = make_space("medium", supernet.dims, fixed_parameters(supernet.model))
    assert space.num_parameters(space.largest()) == sum(p.numel() for p in supernet.model.parameters())
    with torch.no_grad():
        plain = supernet.model(**inputs).logits
        masked = supernet(space.largest(), **inputs).logits
    assert torch.equal(plain, masked)


def test_zero_head_zero_unit_and_dropped_layers(supernet):
    subnet = SubNetwork(heads=(0, 3, 0), units=(5, 0, 0))  # layer 0: no attention, layer 1: no FFN, layer 2: dropped
    assert subnet.kept_layers == (0, 1)
    sliced = supernet.slice(subnet)
    assert sliced.config.num_hidden_layers == 2
    assert sliced.config.nasprune_heads == [0, 3] and sliced.config.nasprune_units == [5, 0]
    with torch.no_grad():
        assert torch.allclose(supernet(subnet, **_inputs()).logits, sliced(**_inputs()).logits, atol=1e-5)


def test_large_space_keeps_chosen_heads(supernet):
    space = make_space("large", supernet.dims, fixed_parameters(supernet.model))
    subnet = space.sample(np.random.default_rng(3))
    assert subnet.head_index is not None
    inputs = _inputs()
    with torch.no_grad():
        assert torch.allclose(supernet(subnet, **inputs).logits, supernet.slice(subnet)(**inputs).logits, atol=1e-5)
    # the same counts with the *first* heads give another network
    prefix = SubNetwork(subnet.heads, subnet.units)
    if prefix != subnet and any(subnet.heads_of(i) != list(range(subnet.heads[i])) for i in range(3)):
        with torch.no_grad():
            assert not torch.allclose(supernet(subnet, **inputs).logits, supernet(prefix, **inputs).logits)


def test_reorder_keeps_full_network_outputs(supernet):
    inputs = _inputs()
    with torch.no_grad():
        before = supernet.model(**inputs).logits.clone()
    d = supernet.dims
    rng = np.random.default_rng(0)
    supernet.reorder_([rng.permutation(d.num_heads).tolist() for _ in range(d.num_layers)],
                      [rng.permutation(d.intermediate_size).tolist() for _ in range(d.num_layers)])
    with torch.no_grad():
        after = supernet.model(**inputs).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_fisher_reorder_puts_important_first_and_keeps_logits(tokenizer):
    from toolchain.importance import fisher_scores, reorder_by_importance

    torch.manual_seed(0)
    sn = SuperNetwork(model_from_config(tiny_config("bert", vocab_size=tokenizer.vocab_size)).eval())
    enc = tokenizer(["a fine movie", "terrible , just terrible", "ok", "the best film of the year"] * 4,
                    padding=True, return_tensors="pt")
    enc = dict(enc, labels=torch.tensor([1, 0, 1, 1] * 4))
    with torch.no_grad():
        before = sn.model(**{k: v for k, v in enc.items() if k != "labels"}).logits.clone()
    info = reorder_by_importance(sn, enc, batch_size=4, progress=False)
    with torch.no_grad():
        after = sn.model(**{k: v for k, v in enc.items() if k != "labels"}).logits
    assert torch.allclose(before, after, atol=1e-5)
    heads, units = fisher_scores(sn, enc, batch_size=4, progress=False)
    # after re-ordering, scores are sorted (most important first) in every layer
    assert torch.all(heads[:, :-1] >= heads[:, 1:] - 1e-9)
    assert torch.all(units[:, :-1] >= units[:, 1:] - 1e-9)
    assert len(info["head_order"]) == sn.dims.num_layers


def test_save_and_load_sliced_roundtrip(tmp_path, supernet):
    subnet = SubNetwork(heads=(2, 0, 4), units=(7, 3, 0))
    sliced = supernet.slice(subnet)
    save_sliced(sliced, tmp_path / "m", subnet=subnet)
    loaded = load_sliced(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(sliced(**_inputs()).logits, loaded(**_inputs()).logits)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in sliced.parameters())


def test_load_sliced_rejects_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        load_sliced(tmp_path)


def test_subnetwork_json_and_validation():
    s = SubNetwork(heads=(1, 2), units=(3, 0))
    assert SubNetwork.from_json(s.to_json()) == s
    with pytest.raises(ValueError, match="layers"):
        s.validate_for(3, 4, 8)
    with pytest.raises(ValueError, match="more than the model has"):
        SubNetwork(heads=(9, 1), units=(1, 1)).validate_for(2, 4, 8)
    with pytest.raises(ValueError, match="JSON"):
        SubNetwork.from_json("{nope")
    with pytest.raises(ValueError):
        SubNetwork(heads=(1,), units=(1, 2))


def test_unknown_space():
    dims = ModelDims("bert", 2, 2, 4, 8, 16, 10, 2)
    with pytest.raises(ValueError, match="small, medium, large, layer"):
        make_space("huge", dims)
