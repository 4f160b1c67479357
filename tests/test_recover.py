"""Recovery stage: distillation brings a pruned point closer to the full network, points and teacher logits are
cached, an interrupted recovery resumes, the recovery texts are the whole training split (holdout excluded)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from toolchain.core.data import tokenize
from toolchain.core.search_space import make_space
from toolchain.core.subnetwork import SubNetwork, uniform_subnet
from toolchain.core.distill import hidden_loss
from toolchain.recover import (RecoverError, RecoverSettings, point_dir, recover_point, recovery_data,
                               screen_point, teacher_logits, teacher_path)
from toolchain.run import DataSettings, train_run
from toolchain.training import TrainConfig
from toolchain.ship.manifest import TWINS
from toolchain.twins import SHARES, TwinChooser, fisher_twin, uniform_twin

POSITIVE = ["good", "great", "superb", "lovely", "brilliant", "fine", "excellent", "wonderful"]
NEGATIVE = ["bad", "awful", "boring", "dull", "poor", "terrible", "weak", "horrible"]
FILLER = ["the", "movie", "film", "plot", "was", "acting", "really", "quite", "story", "cast", "very", "it"]
PRUNED = SubNetwork(heads=(1, 1, 0), units=(6, 4, 0))  # the last layer dropped, little left of the others
N_TRAIN, LIMIT = 240, 48
POINT = SubNetwork(heads=(4, 2, 1), units=(40, 24, 8))  # uneven: a uniform network as fast exists


def _write(path, n, seed, regression):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for _ in range(n):
            pos, neg = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            if not regression and pos == neg:
                pos += 1
            words = list(rng.choice(POSITIVE, pos)) + list(rng.choice(NEGATIVE, neg))
            words += list(rng.choice(FILLER, int(rng.integers(2, 6))))
            rng.shuffle(words)
            label = f"{pos - neg:.1f}" if regression else int(pos > neg)
            w.writerow([" ".join(words), label])


def _run(folder, model_dir, regression=False):
    """A super-network fine-tuned (standard, so the pruned points are far from the full network) on ``LIMIT`` of the
    ``N_TRAIN`` training rows of a small synthetic sentiment task."""
    _write(folder / "train.csv", N_TRAIN, 0, regression)
    _write(folder / "val.csv", 64, 1, regression)
    data = DataSettings(train_file=str(folder / "train.csv"), validation_file=str(folder / "val.csv"),
                        regression=regression, max_train_samples=LIMIT, max_length=32)
    torch.manual_seed(0)
    return train_run(folder / "run", model=str(model_dir), data=data, reorder=False, progress=False,
                     train_config=TrainConfig(strategy="standard", epochs=20, batch_size=16, learning_rate=2e-3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from two intra-op threads; on a shared 2-core machine the two threads wait on each
    other (each step runs 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return _run(tmp_path_factory.mktemp("recover"), tiny_model_dir)


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, tiny_model_dir):
    return _run(tmp_path_factory.mktemp("recover-reg"), tiny_model_dir, regression=True)


def _fast(**kw) -> RecoverSettings:
    return RecoverSettings(**{"samples": None, "epochs": 2, "lr": 2e-3, "batch_size": 16, **kw})


def _teacher_distance(run, model, regression) -> float:
    """How far ``model`` is from the full network on the validation texts (never used by recovery):
    mean KL(teacher || model) for classification, mean squared difference for regression."""
    enc = {k: v for k, v in run.encoded("validation").items() if k != "labels"}
    with torch.no_grad():
        with run.supernet.use(None) as full:
            teacher = full(**enc).logits
        student = model.eval()(**enc).logits
    if regression:
        return float(((student - teacher) ** 2).mean())
    return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.softmax(-1), reduction="batchmean"))


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_recovery_brings_a_pruned_point_closer_to_the_full_network(request, tmp_path, kind):
    run = request.getfixturevalue("run" if kind == "classification" else "regression_run")
    regression = kind == "regression"
    before = _teacher_distance(run, run.supernet.slice(PRUNED), regression)
    point = recover_point(run, PRUNED, _fast(alpha=1.0), cache_dir=tmp_path, progress=False)  # distillation only
    after = _teacher_distance(run, point.model, regression)
    assert after < 0.3 * before, (before, after)
    info = point.info
    assert info["cached"] is False and info["steps"] == info["total_steps"] == 2 * N_TRAIN // 16
    assert info["examples"] == N_TRAIN  # all training text, not the LIMIT rows the super-network saw
    assert info["metric"] == ("spearman" if regression else "accuracy")
    for m in (info["metric_before"], info["metric_after"]):
        assert set(m) >= {"score", "error"} and -1.0 <= m["score"] <= 1.0
    # the shipped model is the sliced architecture: as many parameters as the search space counts
    assert sum(p.numel() for p in point.model.parameters()) == run.space.num_parameters(PRUNED)


def _hidden_distance(run, model) -> float:
    """:func:`hidden_loss` of ``model`` against the full network on the validation texts."""
    enc = {k: v for k, v in run.encoded("validation").items() if k != "labels"}
    with torch.no_grad():
        with run.supernet.use(None) as full:
            teacher = full.eval()(**enc, output_hidden_states=True).hidden_states
        student = model.eval()(**enc, output_hidden_states=True).hidden_states
    return float(hidden_loss(student, teacher, PRUNED.kept_layers, enc["attention_mask"]))


def test_the_hidden_state_term_brings_the_layers_closer_to_the_full_network(run, tmp_path):
    assert float(hidden_loss(*[(torch.ones(2, 3, 4),) * 3] * 2, (0, 1), torch.ones(2, 3))) == 0.0
    assert RecoverSettings(hidden_weight=0.0).key() == RecoverSettings().key() != RecoverSettings(hidden_weight=1).key()
    with pytest.raises(RecoverError):
        RecoverSettings(hidden_weight=-1)
    logits_only = recover_point(run, PRUNED, _fast(alpha=1.0), cache_dir=tmp_path, progress=False)
    layered = recover_point(run, PRUNED, _fast(alpha=1.0, hidden_weight=1.0), cache_dir=tmp_path, progress=False)
    assert layered.path != logits_only.path and layered.info["settings"]["hidden_weight"] == 1.0
    d_layered, d_logits = _hidden_distance(run, layered.model), _hidden_distance(run, logits_only.model)
    assert d_layered < 0.7 * d_logits, (d_layered, d_logits)


def test_frozen_word_embeddings_stay_as_the_super_network_has_them_and_the_rest_still_recovers(run, tmp_path):
    assert RecoverSettings(freeze_embeddings=False).key() == RecoverSettings().key() != RecoverSettings(
        freeze_embeddings=True).key()
    before = _teacher_distance(run, run.supernet.slice(PRUNED), False)
    point = recover_point(run, PRUNED, _fast(alpha=1.0, freeze_embeddings=True), cache_dir=tmp_path, progress=False)
    words = run.supernet.slice(PRUNED).get_input_embeddings().weight
    assert torch.equal(point.model.get_input_embeddings().weight, words)
    assert not torch.equal(point.model.classifier.weight, run.supernet.slice(PRUNED).classifier.weight)
    assert _teacher_distance(run, point.model, False) < 0.3 * before


def test_second_call_loads_the_cached_point(run, tmp_path):
    settings = _fast()
    first = recover_point(run, PRUNED, settings, cache_dir=tmp_path, progress=False)
    folder = point_dir(run, PRUNED, settings, cache_dir=tmp_path)
    assert first.info["score_after"] > first.info["score_before"]  # labels + teacher on all the training text
    assert first.path == folder and {p.name for p in folder.iterdir()} == {"model.safetensors", "info.json",
                                                                           "screen.json"}
    again = recover_point(run, PRUNED, settings, cache_dir=tmp_path, progress=False)
    assert first.info["cached"] is False and again.info["cached"] is True
    assert again.info["score_after"] == first.info["score_after"] and again.info["steps"] == first.info["steps"]
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.model.config.nasprune_heads == [1, 1]  # rebuilt as the sliced architecture
    # other settings are another point; a damaged point is recovered again
    other = recover_point(run, PRUNED, dataclasses.replace(settings, alpha=1.0), cache_dir=tmp_path, progress=False)
    assert other.info["cached"] is False and other.path != folder
    (folder / "model.safetensors").write_bytes(b"damaged")
    assert recover_point(run, PRUNED, settings, cache_dir=tmp_path, progress=False).info["cached"] is False


def test_teacher_logits_are_computed_once(run, tmp_path):
    settings = _fast(samples=100, epochs=1)
    path = teacher_path(run, settings, cache_dir=tmp_path)
    assert not path.exists()
    logits = teacher_logits(run, settings, cache_dir=tmp_path, progress=False)
    assert path.is_file() and logits.shape == (100, 2)
    # the full network's logits on the selected texts, in their order
    enc = tokenize(recovery_data(run, settings), run.tokenizer, run.data.max_length)
    with torch.no_grad():
        direct = run.supernet(None, **{k: v[:7] for k, v in enc.items() if k != "labels"}).logits.numpy()
    assert np.allclose(logits[:7], direct, atol=1e-5)
    # a second call reads the file: a marker written into it comes back
    marker = np.full_like(logits, 3.0)
    np.save(path, marker)
    assert np.array_equal(teacher_logits(run, settings, cache_dir=tmp_path, progress=False), marker)
    np.save(path, logits)
    # recoveries with other training settings but the same texts share it and never rewrite it
    stamp = path.stat().st_mtime_ns
    for lr in (1e-3, 2e-3):
        assert recover_point(run, PRUNED, dataclasses.replace(settings, lr=lr), cache_dir=tmp_path,
                             progress=False).info["teacher"] == str(path)
    assert path.stat().st_mtime_ns == stamp and list(path.parent.iterdir()) == [path]
    # other texts, another teacher file
    assert teacher_path(run, dataclasses.replace(settings, samples=50), cache_dir=tmp_path) != path


def test_the_recovered_full_network_can_be_the_teacher(run, tmp_path):
    """``teacher="recovered"``: the full network is recovered first (from the super-network's, as the unpruned
    reference is), and its logits on the recovery texts are what a point distils; keys and logits of the default
    teacher are those of before the option."""
    settings = _fast(samples=100, epochs=1, teacher="recovered")
    assert RecoverSettings(teacher="supernet").key() == RecoverSettings().key() != settings.key()
    with pytest.raises(RecoverError, match="teacher must be one of"):
        RecoverSettings(teacher="oracle")
    with pytest.raises(RecoverError, match="needs teacher 'supernet'"):
        RecoverSettings(teacher="recovered", hidden_weight=1.0)
    plain = dataclasses.replace(settings, teacher="supernet")
    assert teacher_path(run, settings, cache_dir=tmp_path) != teacher_path(run, plain, cache_dir=tmp_path)
    full = run.supernet.full()
    # the full network itself is recovered from the super-network's: the same point either way
    assert point_dir(run, full, plain, cache_dir=tmp_path) == recover_point(
        run, full, settings, cache_dir=tmp_path, progress=False).path
    recovered = recover_point(run, full, plain, cache_dir=tmp_path, progress=False)
    assert recovered.info["cached"] is True
    logits = teacher_logits(run, settings, cache_dir=tmp_path, progress=False)
    enc = tokenize(recovery_data(run, settings), run.tokenizer, run.data.max_length)
    with torch.no_grad():
        direct = recovered.model(**{k: v[:7] for k, v in enc.items() if k != "labels"}).logits.numpy()
        shared = run.supernet(None, **{k: v[:7] for k, v in enc.items() if k != "labels"}).logits.numpy()
    assert np.allclose(logits[:7], direct, atol=1e-5) and not np.allclose(logits[:7], shared, atol=1e-3)
    point = recover_point(run, PRUNED, settings, cache_dir=tmp_path, progress=False)
    assert point.info["teacher"] == str(teacher_path(run, settings, cache_dir=tmp_path))
    assert point.path != point_dir(run, PRUNED, plain, cache_dir=tmp_path)


def test_interrupted_recovery_resumes_from_its_checkpoint(run, tmp_path):
    settings = _fast(checkpoint_every=2)  # 30 steps

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_point(run, PRUNED, settings, cache_dir=tmp_path / "a", progress=False, on_step=interrupt)
    folder = point_dir(run, PRUNED, settings, cache_dir=tmp_path / "a")
    assert json.loads((folder / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (folder / "info.json").exists()

    seen = []
    resumed = recover_point(run, PRUNED, settings, cache_dir=tmp_path / "a", progress=False, on_step=seen.append)
    assert resumed.info["resumed_from"] == 4 and seen == list(range(5, 31)) and resumed.info["steps"] == 30
    assert not (folder / "checkpoint").exists()
    # it ends where an uninterrupted recovery ends
    whole = recover_point(run, PRUNED, settings, cache_dir=tmp_path / "b", progress=False)
    assert whole.info["resumed_from"] is None
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_a_screened_recovery_goes_on_to_the_weights_of_one_without_the_stop(run, tmp_path):
    """screen_point trains to its share of the steps, records the score and keeps the checkpoint; recover_point
    then goes on from it and ends where a recovery that never stopped ends, which records the same score."""
    settings = _fast(checkpoint_every=7, screen=0.3)  # 30 steps: scored after 9
    folder = point_dir(run, PRUNED, settings, cache_dir=tmp_path / "a")
    screened = screen_point(run, PRUNED, settings, cache_dir=tmp_path / "a", progress=False)
    assert (screened["step"], screened["total_steps"], screened["cached"]) == (9, 30, False)
    assert json.loads((folder / "checkpoint" / "state.json").read_text())["step"] == 9
    assert not (folder / "info.json").exists()
    again = screen_point(run, PRUNED, settings, cache_dir=tmp_path / "a", progress=False)
    assert again["cached"] and again["score"] == screened["score"]
    seen = []
    resumed = recover_point(run, PRUNED, settings, cache_dir=tmp_path / "a", progress=False, on_step=seen.append)
    assert resumed.info["resumed_from"] == 9 and seen == list(range(10, 31)) and not (folder / "checkpoint").exists()
    whole = recover_point(run, PRUNED, settings, cache_dir=tmp_path / "b", progress=False)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # the recovery that never stopped scored the same step the same way; a screening of it trains nothing more
    other = screen_point(run, PRUNED, settings, cache_dir=tmp_path / "b", progress=False)
    assert other["cached"] and other["score"] == pytest.approx(screened["score"], abs=1e-9)
    # another share is scored again (on from the start), and the finished point is left as it was
    later = screen_point(run, PRUNED, dataclasses.replace(settings, screen=0.5), cache_dir=tmp_path / "b",
                         progress=False)
    assert (later["step"], later["cached"]) == (15, False)
    assert recover_point(run, PRUNED, settings, cache_dir=tmp_path / "b", progress=False).info["cached"]
    assert not (point_dir(run, PRUNED, settings, cache_dir=tmp_path / "b") / "checkpoint").exists()
    with pytest.raises(RecoverError, match="screen"):
        RecoverSettings(screen=0.0)


def test_recovery_texts_are_the_whole_training_split_without_the_holdout(run):
    full = recovery_data(run, RecoverSettings(samples=None))
    assert len(full) == N_TRAIN and len(run.data.load("train")) == LIMIT
    some = recovery_data(run, RecoverSettings(samples=100, seed=1))
    assert len(some) == 100 and set(some.texts) <= set(full.texts)
    assert recovery_data(run, RecoverSettings(samples=100, seed=1)).texts == some.texts  # seeded
    assert recovery_data(run, RecoverSettings(samples=100, seed=2)).texts != some.texts
    held_run = dataclasses.replace(run, data=dataclasses.replace(run.data, holdout=0.25))
    rest = recovery_data(held_run, RecoverSettings(samples=None))
    held = held_run.data.load("holdout")
    assert len(rest) == N_TRAIN - len(held)
    assert sorted(rest.texts + held.texts) == sorted(full.texts)  # the two split the training data
    assert teacher_path(held_run) != teacher_path(run)


def _param_costs(run):
    """The hardware side of a candidate as the parameter objective: what ``pipeline.cost_metrics`` gives, with the
    exact parameter count standing in for the latency prediction (no latency table of the tiny model)."""
    def costs(subnet):
        n = float(run.space.num_parameters(subnet))
        return {"latency": n, "memory": 0.0, "params": n}
    return costs


def test_the_uniform_twin_is_the_largest_uniform_network_no_slower_than_the_point(run):
    costs = _param_costs(run)
    twin = uniform_twin(run, POINT, costs, {})
    dims = run.supernet.dims
    assert len(set(twin.heads)) == 1 and len(set(twin.units)) == 1 and 0 not in twin.heads  # every layer, one share
    assert costs(twin)["latency"] <= costs(POINT)["latency"]
    bigger = [s for s in (uniform_subnet(dims, share) for share in SHARES) if costs(s)["latency"] >
              costs(twin)["latency"]]
    assert bigger and all(costs(s)["latency"] > costs(POINT)["latency"] for s in bigger)
    # the search's constraints hold for the twin too; none when nothing uniform fits, or it is the point itself
    limited = uniform_twin(run, POINT, costs, {"params": costs(twin)["params"] - 1})
    assert limited is not None and costs(limited)["params"] < costs(twin)["params"]
    assert uniform_twin(run, POINT, costs, {"params": 1.0}) is None
    assert uniform_twin(run, twin, costs, {}) is None
    layer_run = dataclasses.replace(run, space=make_space("layer", dims, run.space.fixed_params))
    assert uniform_twin(layer_run, POINT, costs, {}) is None  # not a member of the LAYER space


def test_the_chooser_exports_the_better_of_a_point_and_its_uniform_twin_after_recovery(run):
    """Recovery so short and slow that it leaves the shared weights as they are, so that which of the two scores
    higher after it is known beforehand (their shared-weight scores on the 64 validation rows). Both are scored
    after the screening share of their recovery; only the better one is recovered to the end."""
    settings = _fast(samples=16, epochs=1, lr=1e-9)
    costs = _param_costs(run)
    twin = SubNetwork(heads=(3, 3, 3), units=(34, 34, 34))
    outcomes = {}
    for point, winner in ((SubNetwork((4, 4, 1), (48, 48, 8)), "twin"), (SubNetwork((1, 4, 4), (8, 48, 48)), "point")):
        assert uniform_twin(run, point, costs, {}) == twin
        chooser = TwinChooser(run, costs, {}, settings, progress=False)
        record = {"subnet": point, "key": point.key(), "error": 0.4, "score": 0.6, "search_error": 0.45,
                  **costs(point)}
        got = chooser(record)
        screened = {n: screen_point(run, s, settings, progress=False) for n, s in (("point", point), ("twin", twin))}
        assert all(r["cached"] for r in screened.values())  # the chooser scored both
        assert (screened["point"]["score"] > screened["twin"]["score"]) == (winner == "point")  # as the shared weights
        note = got["uniform_twin"]
        assert (note["point"], note["twin"], note["chosen"]) == (point.key(), twin.key(), winner)
        assert (note["point_screen_score"], note["twin_screen_score"]) == (screened["point"]["score"],
                                                                           screened["twin"]["score"])
        assert note["screen_steps"] == [screened["point"]["step"], screened["point"]["total_steps"]] == [1, 1]
        chosen, other = (twin, point) if winner == "twin" else (point, twin)
        mine = recover_point(run, chosen, settings, progress=False).info
        assert mine["cached"] and note[f"{winner}_score_after_recovery"] == mine["score_after"]  # the export reuses it
        loser = "point" if winner == "twin" else "twin"
        assert f"{loser}_score_after_recovery" not in note  # not recovered further, its checkpoint not kept
        names = {p.name for p in point_dir(run, other, settings).iterdir()}
        assert "checkpoint" not in names and (names == {"screen.json"} or winner == "point")  # (the twin: done before)
        if winner == "twin":
            assert got["subnet"] == twin and got["search_error"] is None and got["latency"] == costs(twin)["latency"]
            assert got["score"] == mine["score_before"] and got["error"] == 1 - mine["score_before"]
        else:
            assert got["subnet"] == point and {k: got[k] for k in record} == record
        assert chooser.chosen == {point.key(): got["subnet"].key()}
        outcomes[winner] = chooser
    # the full network has no twin; a twin already handed out is not handed out again
    chooser = outcomes["twin"]
    full = run.supernet.full()
    assert chooser({"subnet": full, "score": 0.9}) == {"subnet": full, "score": 0.9}
    neighbour = SubNetwork((4, 4, 1), (48, 47, 8))
    assert uniform_twin(run, neighbour, costs, {}) == twin
    assert chooser({"subnet": neighbour, "score": 0.5}) == {"subnet": neighbour, "score": 0.5}
    assert chooser.chosen[neighbour.key()] == neighbour.key()


def test_the_fisher_twin_is_retraining_free_prunings_mask_at_the_points_cost_and_the_best_of_three_is_exported(run):
    """The mask of Kwon et al.'s search at the point's cost (parameters here), then the best of the point, its
    uniform twin and that mask after a recovery that leaves the shared weights as they are (all three recovered to
    the end: no screening)."""
    settings = _fast(samples=16, epochs=1, lr=1e-9, screen=1.0)
    costs = _param_costs(run)
    point = SubNetwork((4, 4, 1), (48, 48, 8))
    chooser = TwinChooser(run, costs, {}, settings, progress=False, fisher_samples=32)
    grads = chooser.grads()  # of the full network, on 32 training rows
    assert grads.head_importance().shape == (3, 4) and chooser.grads() is grads  # once
    mask = fisher_twin(run, point, costs, {}, grads)
    assert mask is not None and mask.head_index is not None  # which heads and units: chosen by their importance
    assert costs(point)["latency"] - 100 <= costs(mask)["latency"] <= costs(point)["latency"]  # the budget, used up
    assert fisher_twin(run, point, costs, {"params": costs(point)["params"] / 2}, grads) is None  # infeasible
    record = {"subnet": point, "key": point.key(), "error": 0.4, "score": 0.6, "search_error": 0.45, **costs(point)}
    got = chooser(record)
    note = got["uniform_twin"]
    assert (note["fisher"], note["twin"]) == (mask.key(), uniform_twin(run, point, costs, {}).key())
    after = {n: recover_point(run, SubNetwork(**note[f"{n}_subnet"]) if n != "point" else point, settings,
                              progress=False).info["score_after"] for n in ("point", "twin", "fisher")}
    assert after == {n: note[f"{n}_score_after_recovery"] for n in after} and "screen_steps" not in note
    assert note["chosen"] == max(after, key=after.get) and got["subnet"].key() == note[note["chosen"]]
    assert TwinChooser(run, costs, {}, settings, progress=False, uniform=False)(record) == record  # both off


@pytest.mark.slow
def test_nasprune_export_ships_the_better_of_each_point_and_its_uniform_twin(run, tmp_path, monkeypatch, capsys):
    """The search and export stages over the synthetic task's run folder: every exported sub-network of the search
    was recovered beside its uniform twin, and the one of the two that scored higher after recovery is what was
    exported, as nasprune.json, the manifest and the report say."""
    import shutil

    from latency_models.cache import run_profile
    from toolchain.cli import main

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "run"
    shutil.copytree(run.folder, folder)
    table = tmp_path / "table.json"
    run_profile("cpu", model=run.settings["model"], out=str(table), unit_step=48, calibrate_samples=0,
                validate_samples=0, measurement={"warmup": 1, "min_reps": 3, "min_time_s": 0.0, "max_reps": 3},
                progress=False)
    common = ["--latency-table", str(table), "--max-latency", "50ms", "--preset", "quick", "--precision", "fp32"]
    assert main(["search", str(folder), *common, "--n-evals", "24", "--search-eval-samples", "48"]) == 0
    assert main(["export", str(folder), *common, "--export", "3", "--recover-samples", "64"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    # a user's files are called what they are, not the default GLUE task
    assert manifest["settings"]["task"] == "custom" and manifest["settings"]["data"] == "custom (train.csv, val.csv)"
    assert "custom on cpu" in (folder / "report.html").read_text()
    full = run.supernet.full()
    twins = 0
    for p in manifest["points"]:
        info = json.loads((folder / p["path"] / "nasprune.json").read_text())
        subnet = SubNetwork(**info["subnetwork"])
        note = info["extra"].get("uniform_twin")
        assert p["uniform_twin"] == note
        if note is None:  # the unpruned network, a uniform point, or one whose twin an earlier point took
            continue
        twins += 1
        assert subnet.key() == note[note["chosen"]]  # the exported sub-network is the one chosen
        assert subnet != full and info["extra"]["recovery"]["cached"]  # recovered by the choice, reused by the export
        assert info["extra"]["recovery"]["score_after"] == note[f"{note['chosen']}_score_after_recovery"]
        ranked = {n: note[f"{n}_screen_score"] for n in ("point", *TWINS) if f"{n}_screen_score" in note}
        assert note["chosen"] == max(ranked, key=ranked.get)  # the best after screening (the point on a tie)
        assert set(ranked) > {"point"} and all(note[f"{n}_latency_ms"] <= note["point_latency_ms"] for n in ranked
                                               if n != "point")
    assert twins, manifest["points"]
    for p in manifest["points"]:  # the printed table says which point is a twin, and of which point
        if (t := p["uniform_twin"] or {}).get("chosen") in TWINS:
            assert f"{t[t['chosen']]}: the {TWINS[t['chosen']]} of the search's {t['point']}" in printed
    html = (folder / "report.html").read_text()
    assert "origin" in html and ("twin of the search" in html) == any(
        (p["uniform_twin"] or {}).get("chosen") in TWINS for p in manifest["points"] if p["feasible"])


def test_a_run_tokenizes_each_selection_once(run):
    """Recoveries, screenings and evaluations of one compile share the tokenized texts; each gets its own dict."""
    a = run.encoded("validation")
    a["index"] = torch.arange(len(a["input_ids"]))
    b = run.encoded("validation")
    assert "index" not in b and b["input_ids"] is a["input_ids"]
    assert run.encoded("validation", max_samples=3)["input_ids"].shape[0] == 3


def test_the_export_chooses_on_dev_and_training_examples_nothing_trained_on(run):
    """toolchain.heldout: dev first, then unused training examples (neither the super-network's training subset nor
    the recovery's texts), at least as long as dev's shorter quarter; each part scored on its own."""
    from toolchain.heldout import DEV, UNUSED, selection_data, selection_metric, words
    from toolchain.ship.verify import _score, predict_torch

    settings = RecoverSettings(samples=100, seed=0)
    data, info = selection_data(run, settings, 50, seed=0)
    dev = run.data.load("validation")
    extra = data.texts[len(dev):]
    assert data.texts[:len(dev)] == dev.texts and 0 < len(extra) <= 50
    assert info["parts"] == {DEV: [0, len(dev)], UNUSED: [len(dev), len(data)]}
    assert not set(extra) & (set(run.data.load("train").texts) | set(recovery_data(run, settings).texts))
    assert min(words(t) for t in extra) >= info["min_words"] > 0
    assert selection_data(run, settings, 50, seed=0)[0].texts == data.texts  # the same draw again
    assert selection_data(run, settings, 0, seed=0)[1]["parts"] == {DEV: [0, len(dev)]}
    # a recovery on the whole training split leaves nothing unused: dev alone
    assert selection_data(run, RecoverSettings(samples=None), 50, seed=0)[0].texts == dev.texts

    scored = selection_metric(run, settings, 50, seed=0)
    right = np.eye(2)[scored.labels]
    right[len(dev):] = right[len(dev):, ::-1]  # wrong on every selection example
    metric = _score(scored, right)
    assert metric["parts"] == {DEV: {"score": 1.0, "num_examples": len(dev)},
                               UNUSED: {"score": 0.0, "num_examples": len(extra)}}
    assert metric["score"] == pytest.approx(len(dev) / len(scored))
    assert metric["selection"] == {"asked": 50, "seed": 0, "min_words": info["min_words"]}
    # batched by length, returned in the rows' order
    model = run.supernet.model.eval()
    batched = predict_torch(model, scored.inputs, batch_size=8)
    one = predict_torch(model, {k: v[5:6] for k, v in scored.inputs.items()}, batch_size=1)
    np.testing.assert_allclose(batched[5:6], one, atol=1e-4)
