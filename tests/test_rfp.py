"""Retraining-free pruning (Kwon et al. 2022): per-sample mask gradients, search, rearrangement, tuning, folding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latency_models.assemble import TABLE_FORMAT, TABLE_VERSION
from latency_models.lookup_table import LatencyTable
from toolchain.core.modeling import ModelDims, layers_of, model_from_config, tiny_config
from toolchain.rfp import (MaskGradients, Scales, apply_scales, fold_scales, mask_gradients, prune, rearrange_mask, search_mask,
                           tune_mask)
from toolchain.core.search_space import fixed_parameters, layer_parameters
from toolchain.core.slicing import head_columns, slice_model
from toolchain.core.subnetwork import SubNetwork, subnetwork_from_masks
from toolchain.core.supernet import SuperNetwork


def _model(family="bert", num_labels=2, seed=0):
    torch.manual_seed(seed)
    return model_from_config(tiny_config(family, num_labels=num_labels, initializer_range=0.2)).eval()


def _encoded(family="bert", n=10, seq=12, regression=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(3, 128, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids[mask == 0] = pad
    labels = torch.randn(n, generator=g) if regression else torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _param_cost(model):
    d, fixed = ModelDims.from_config(model.config), fixed_parameters(model)
    return lambda s: fixed + sum(layer_parameters(d.hidden_size, d.head_size, h, u) for h, u in zip(s.heads, s.units))


def _masked(model, head_masks, unit_masks):
    """Pre-hooks multiplying the inputs of each layer's output projections by the given feature masks."""
    return [h for layer, hm, um in zip(layers_of(model), head_masks, unit_masks) for h in (
        layer.attention.output.dense.register_forward_pre_hook(lambda m, a, v=hm: (a[0] * v,)),
        layer.output.dense.register_forward_pre_hook(lambda m, a, v=um: (a[0] * v,)))]


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family,regression", [("bert", False), ("roberta", False), ("bert", True)])
def test_per_sample_gradients_equal_one_sample_at_a_time(family, regression):
    model = _model(family, num_labels=1 if regression else 2)
    enc = _encoded(family, regression=regression)
    grads = mask_gradients(model, enc, n_samples=7, batch_size=4, seed=3, progress=False)
    d = ModelDims.from_config(model.config)
    assert len(grads.index) == 7 and grads.heads[0].shape == (7, d.num_heads) and grads.units[2].shape == (7, 48)
    for row, i in enumerate(grads.index.tolist()):  # one sample, trimmed to its own length, HF's own loss
        n = int(enc["attention_mask"][i].sum())
        hv = [torch.ones(d.num_heads, requires_grad=True) for _ in range(d.num_layers)]
        uv = [torch.ones(d.intermediate_size, requires_grad=True) for _ in range(d.num_layers)]
        handles = _masked(model, [v.repeat_interleave(d.head_size) for v in hv], uv)
        try:
            one = {k: v[i:i + 1, :n] for k, v in enc.items() if k != "labels"}
            loss = model(**one, labels=enc["labels"][i:i + 1]).loss
        finally:
            for h in handles:
                h.remove()
        expected = torch.autograd.grad(loss, hv + uv)
        for layer in range(d.num_layers):
            assert torch.allclose(grads.heads[layer][row], expected[layer], atol=1e-5)
            assert torch.allclose(grads.units[layer][row], expected[d.num_layers + layer], atol=1e-5)
    assert grads.head_importance().abs().sum() > 0  # not trivially zero


def test_gradients_sample_is_seeded_and_checks_labels():
    model, enc = _model(), _encoded(n=12)
    a = mask_gradients(model, enc, n_samples=5, seed=0, progress=False)
    b = mask_gradients(model, enc, n_samples=5, seed=0, progress=False)
    assert torch.equal(a.index, b.index) and torch.equal(a.units[1], b.units[1])
    assert not torch.equal(a.index, mask_gradients(model, enc, n_samples=5, seed=1, progress=False).index)
    with pytest.raises(ValueError, match="labels"):
        mask_gradients(model, {k: v for k, v in enc.items() if k != "labels"}, progress=False)


# ---------------------------------------------------------------------------------------------------- search
def _random_grads(L, H, U, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MaskGradients([torch.randn(n, H, generator=g) for _ in range(L)],
                         [torch.randn(n, U, generator=g) * 0.5 for _ in range(L)], torch.arange(n))


def _removed(grads, subnet):
    hi, ui = grads.head_importance(), grads.unit_importance()
    return float(sum(hi[i].sum() - hi[i, subnet.heads_of(i)].sum() + ui[i].sum() - ui[i, subnet.units_of(i)].sum()
                     for i in range(subnet.num_layers)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_is_optimal_under_a_linear_cost_over_all_masks(seed):
    L, H, U = 2, 2, 3
    grads = _random_grads(L, H, U, seed=seed)
    cost = lambda s: 1.0 + 3.0 * sum(s.heads) + 2.0 * sum(s.units)  # noqa: E731
    masks = [subnetwork_from_masks([m[:H], m[H:2 * H]], [m[2 * H:2 * H + U], m[2 * H + U:]])
             for m in itertools.product([0, 1], repeat=L * (H + U))]  # every choice of kept heads and units
    for budget in (1.0, 4.5, 9.0, 12.0, 17.0):
        subnet = search_mask(grads, budget, cost)
        assert cost(subnet) <= budget
        best = min(_removed(grads, m) for m in masks if cost(m) <= budget)
        assert _removed(grads, subnet) <= best + 1e-9


def test_search_on_a_parameter_budget_matches_brute_force():
    model = _model()
    d, cost = ModelDims.from_config(model.config), _param_cost(model)
    grads = mask_gradients(model, _encoded(n=8), n_samples=8, progress=False)
    h_order = grads.head_importance().flatten().argsort(descending=True, stable=True)
    u_order = grads.unit_importance().flatten().argsort(descending=True, stable=True)

    def top(h, n):  # the globally most important h heads and n units
        hm = torch.zeros(d.num_layers * d.num_heads, dtype=torch.bool)
        um = torch.zeros(d.num_layers * d.intermediate_size, dtype=torch.bool)
        hm[h_order[:h]], um[u_order[:n]] = True, True
        hi = [torch.nonzero(r).flatten().tolist() for r in hm.view(d.num_layers, -1)]
        ui = [torch.nonzero(r).flatten().tolist() for r in um.view(d.num_layers, -1)]
        return SubNetwork([len(r) for r in hi], [len(r) for r in ui], hi, ui)

    full = cost(SubNetwork.full(d.num_layers, d.num_heads, d.intermediate_size))
    for fraction in (0.45, 0.7, 0.9):
        budget = fraction * full
        subnet = search_mask(grads, budget, cost)
        assert cost(subnet) <= budget
        brute = min(_removed(grads, top(h, n)) for h in range(d.num_layers * d.num_heads + 1)
                    for n in range(0, d.num_layers * d.intermediate_size + 1, 3) if cost(top(h, n)) <= budget)
        assert _removed(grads, subnet) <= brute + 1e-9
    assert sum(search_mask(grads, full, cost).heads) == d.num_layers * d.num_heads


def _table(num_heads=4, units=48):
    heads = list(range(num_heads + 1))
    grid_units = [0, units // 2, units]
    lat = [[0.2 + 0.5 * h + 0.01 * u for u in grid_units] for h in heads]
    return LatencyTable({
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "model": {}, "measurement": {},
        "fingerprint": {"precision": "fp32", "provider": "cpu", "onnxruntime": "test", "threads": 1},
        "grid": {"heads": heads, "units": grid_units}, "base": {"latency_ms": 2.0, "memory_mb": 1.0},
        "blocks": {"latency_ms": lat, "weights_mb": lat, "working_mb": lat}})


def test_search_with_a_latency_table_and_invalid_budgets():
    grads, table = _random_grads(3, 4, 48, seed=4), _table()
    for budget in (2.5, 4.0, 6.0):
        subnet = search_mask(grads, budget, table)
        assert table.predict_latency(subnet) <= budget
    assert search_mask(grads, 2.0, table.predict_latency) == SubNetwork((0, 0, 0), (0, 0, 0), ((),) * 3, ((),) * 3)
    with pytest.raises(ValueError, match=r"smallest achievable cost .* is 2 "):
        search_mask(grads, 1.5, table)
    for bad in (0, -1.0, math.nan, math.inf, "5ms"):
        with pytest.raises(ValueError, match="positive finite number"):
            search_mask(grads, bad, table)
    with pytest.raises(ValueError, match="non-empty list"):
        prune(_model(), _encoded(), None, [], table, progress=False)
    with pytest.raises(ValueError, match="smallest achievable"):  # fails before computing gradients
        prune(_model(), _encoded(), None, [5.0, 1.0], table, progress=False)


# ------------------------------------------------------------------------------------------------ rearrange
def _quad(grads, subnet):
    """Per layer and kind: 0.5 (1-m)^T F (1-m) with F = G^T G."""
    out = []
    for i in range(subnet.num_layers):
        for G, kept in ((grads.heads[i], subnet.heads_of(i)), (grads.units[i], subnet.units_of(i))):
            r = torch.ones(G.shape[1], dtype=torch.float64)
            r[kept] = 0
            out.append(0.5 * float(r @ (G.double().T @ G.double()) @ r))
    return out


def test_rearrangement_keeps_counts_and_never_increases_the_quadratic_loss():
    improved = False
    for seed in range(4):
        grads = _random_grads(3, 4, 10, n=5, seed=seed)
        grads.units = [g + 2 * g[:, :1] for g in grads.units]  # correlated units
        cost = lambda s: sum(s.heads) + 0.3 * sum(s.units)  # noqa: E731
        for budget in (3.0, 6.0, 10.0):
            subnet = search_mask(grads, budget, cost)
            new = rearrange_mask(grads, subnet)
            assert new.heads == subnet.heads and new.units == subnet.units
            for before, after in zip(_quad(grads, subnet), _quad(grads, new)):
                assert after <= before + 1e-9
                improved |= after < before - 1e-9
    assert improved  # the greedy choice differs from the diagonal one somewhere


def test_rearrangement_keeps_the_diagonal_choice_when_greedy_is_worse():
    G = torch.tensor([[-2.0, 2.0, 0.1, 0.1, -1.7], [2.3, 1.0, 2.2, -1.1, 0.3], [1.1, -0.4, -0.6, -0.8, 0.2]])
    grads = MaskGradients([G], [torch.zeros(3, 2)], torch.arange(3))
    subnet = SubNetwork((2,), (2,), ((0, 2),), ((0, 1),))  # the two largest diagonal entries kept
    # greedy would remove heads {2, 3, 4}: 0.5 (1-m)^T F (1-m) = 2.825 instead of 0.6 for the diagonal {1, 3, 4}
    assert rearrange_mask(grads, subnet) == subnet


# ---------------------------------------------------------------------------------------------------- tuning
def _dense_outputs(model, enc, layers):
    """Outputs of attention.output.dense and output.dense of the given layers, on non-padding tokens."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, a, out: seen.append(out.detach()))
               for i in layers for m in (layers_of(model)[i].attention.output.dense, layers_of(model)[i].output.dense)]
    try:
        with torch.no_grad():
            model(**{k: v for k, v in enc.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    tok = enc["attention_mask"].bool()
    return [o[tok] for o in seen]


def test_tuning_reduces_the_reconstruction_error_and_leaves_the_model_untouched():
    model, enc = _model(seed=2), _encoded(n=16, seq=14)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    subnet = SubNetwork((2, 1, 3), (20, 30, 10), ((0, 3), (2,), (0, 1, 2)), (tuple(range(0, 40, 2)),
                                                                               tuple(range(30)), tuple(range(10, 20))))
    model.train()  # the tiny configs have no dropout: train mode changes nothing but the flag
    scales = tune_mask(model, subnet, enc, n_samples=16, batch_size=8, progress=False)
    assert model.training
    assert [len(r) for r in scales.heads] == list(subnet.heads) and [len(r) for r in scales.units] == list(subnet.units)
    assert all(e["after"] <= e["before"] for e in scales.errors) and len(scales.errors) == 6
    sliced = apply_scales(model, subnet, scales)
    plain = SuperNetwork(model).slice(subnet)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    reference = _dense_outputs(model, enc, range(3))
    tuned, untuned = _dense_outputs(sliced, enc, range(3)), _dense_outputs(plain, enc, range(3))
    err = lambda outs: [float((o - r).pow(2).sum()) for o, r in zip(outs, reference)]  # noqa: E731
    assert err(tuned)[0] < err(untuned)[0]  # first block: same inputs, least squares must win
    assert sum(err(tuned)) < sum(err(untuned))
    assert scales.heads != Scales.ones(subnet).heads


def test_tuning_with_a_dropped_layer_before_the_tuned_ones():
    """Kept layers are tuned by their index in the full model, also when an earlier layer is dropped."""
    model, enc = _model(seed=3), _encoded(n=12, seq=10)
    subnet = SubNetwork((0, 0, 2), (0, 12, 20))  # layer 0 dropped, layer 1 keeps no head
    scales = tune_mask(model, subnet, enc, n_samples=12, batch_size=6, progress=False)
    assert [(e["layer"], e["block"]) for e in scales.errors] == [(1, "ffn"), (2, "attention"), (2, "ffn")]
    assert all(e["after"] <= e["before"] for e in scales.errors)
    assert [len(r) for r in scales.units] == [0, 12, 20]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sliced_rescaled_model_equals_masked_model_with_scales(family):
    model, enc = _model(family), _encoded(family)
    d = ModelDims.from_config(model.config)
    subnet = SubNetwork((0, 2, 0), (5, 0, 0), ((), (1, 3), ()), ((0, 7, 9, 20, 47), (), ()))  # last layer dropped
    g = torch.Generator().manual_seed(0)
    scales = Scales([[float(x) for x in torch.rand(h, generator=g) * 3 - 1] for h in subnet.heads],
                    [[float(x) for x in torch.rand(u, generator=g) * 3 - 1] for u in subnet.units])
    head_masks, unit_masks = [], []  # scale vectors on the features; SuperNetwork zeroes the rest, drops layer 2
    for i in range(d.num_layers):
        hm, um = torch.ones(d.num_heads * d.head_size), torch.ones(d.intermediate_size)
        hm[head_columns(subnet.heads_of(i), d.head_size)] = torch.tensor(scales.heads[i]).repeat_interleave(d.head_size)
        um[subnet.units_of(i)] = torch.tensor(scales.units[i])
        head_masks.append(hm)
        unit_masks.append(um)
    supernet = SuperNetwork(model)
    handles = _masked(model, head_masks, unit_masks)
    inputs = {k: v for k, v in enc.items() if k != "labels"}
    try:
        with torch.no_grad():
            masked = supernet(subnet, **inputs).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        sliced = apply_scales(model, subnet, scales)(**inputs).logits
        unscaled = supernet(subnet, **inputs).logits
    assert torch.allclose(masked, sliced, atol=1e-4), (masked - sliced).abs().max()
    assert not torch.allclose(masked, unscaled, atol=1e-4)
    # the full-size folded copy (what compile evaluates and exports) computes the same network, masked or sliced
    folded = fold_scales(model, subnet, scales)
    with torch.no_grad():
        assert torch.allclose(SuperNetwork(folded)(subnet, **inputs).logits, sliced, atol=1e-4)
        assert torch.allclose(slice_model(folded, subnet)(**inputs).logits, sliced, atol=1e-4)
        assert torch.allclose(supernet(subnet, **inputs).logits, unscaled)  # the input model is untouched
    with pytest.raises(ValueError, match="do not match"):
        apply_scales(model, subnet, Scales.ones(SubNetwork.full(3, 4, 48)))


def test_scales_json_roundtrip():
    import json

    s = Scales([[1.5, -0.25], []], [[2.0], [0.5, 1.0]], [{"layer": 0, "block": "ffn", "before": 0.3, "after": 0.1}])
    assert Scales.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_prune_end_to_end_on_parameter_budgets():
    model, enc = _model(seed=3), _encoded(n=12)
    cost = _param_cost(model)
    full = cost(SubNetwork.full(3, 4, 48))
    results = prune(model, enc, None, [0.6 * full, 0.85 * full], cost, n_samples=12, batch_size=6, progress=False)
    assert [r.budget for r in results] == [0.6 * full, 0.85 * full]
    for r in results:
        assert r.cost == cost(r.subnet) <= r.budget
        assert set(r.timings) == {"gradients", "search", "rearrange", "tune"}
        sliced = apply_scales(model, r.subnet, r.scales)
        assert sum(p.numel() for p in sliced.parameters()) == r.cost
        assert r.to_dict()["subnetwork"]["heads"] == list(r.subnet.heads)
    assert results[0].cost < results[1].cost
