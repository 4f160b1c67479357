"""Weight-sharing training: every strategy runs, resume after an interrupt ends where an uninterrupted run ends,
damaged checkpoints are reported, the run folder stages work on real data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from toolchain.evaluation import Evaluator
from toolchain.core.modeling import model_from_config, tiny_config
from toolchain.core.search_space import fixed_parameters, make_space
from toolchain.core.subnetwork import SubNetwork
from toolchain.core.supernet import SuperNetwork
from toolchain.training import STRATEGIES, CheckpointError, TrainConfig, load_checkpoint, train


def _setup(tokenizer, regression=False):
    torch.manual_seed(0)
    cfg = tiny_config("bert", vocab_size=tokenizer.vocab_size, num_labels=1 if regression else 2,
                      hidden_dropout_prob=0.1)
    if regression:
        cfg.problem_type = "regression"
    sn = SuperNetwork(model_from_config(cfg))
    space = make_space("medium", sn.dims, fixed_parameters(sn.model))
    texts = ["good", "bad movie", "a great film", "awful , boring", "fine", "not good at all", "superb", "meh"] * 3
    enc = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    enc["labels"] = torch.rand(len(texts)) * 5 if regression else torch.tensor([1, 0, 1, 0, 1, 0, 1, 0] * 3)
    return sn, space, enc


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains(tokenizer, strategy):
    sn, space, enc = _setup(tokenizer, regression=strategy == "kd")
    before = {k: v.clone() for k, v in sn.model.state_dict().items()}
    stats = train(sn, space, enc, TrainConfig(strategy=strategy, epochs=1, batch_size=8), progress=False)
    assert stats["steps"] == 3
    changed = [k for k, v in sn.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training changed no weight"


def test_resume_after_interrupt_matches_uninterrupted(tokenizer, tmp_path):
    cfg = TrainConfig(strategy="sandwich", epochs=2, batch_size=4, checkpoint_every=2, seed=3)
    sn_a, space, enc = _setup(tokenizer)
    train(sn_a, space, enc, cfg, tmp_path / "a", progress=False)

    sn_b, space_b, _ = _setup(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(sn_b, space_b, enc, cfg, tmp_path / "b", progress=False, stop_after=5)  # mid-epoch 1 (6 steps/epoch)
    state = json.loads((tmp_path / "b" / "last" / "state.json").read_text())
    assert state["step"] == 5
    # a kill between the two renames of a checkpoint save: no "last", the new one in last.tmp, the old in last.old
    last = tmp_path / "b" / "last"
    shutil.copytree(last, last.with_name("last.old"))
    last.rename(last.with_name("last.tmp"))
    sn_c, space_c, _ = _setup(tokenizer)  # a fresh process would start from the pre-trained weights again
    stats = train(sn_c, space_c, enc, cfg, tmp_path / "b", progress=False)
    assert stats["steps"] == 12 and json.loads((last / "state.json").read_text())["step"] == 12
    assert stats["steps"] == 12
    for (k, a), (_, c) in zip(sn_a.model.state_dict().items(), sn_c.model.state_dict().items()):
        assert torch.allclose(a, c, atol=1e-5), k


def test_damaged_checkpoint_is_a_clear_error(tokenizer, tmp_path):
    sn, space, enc = _setup(tokenizer)
    cfg = TrainConfig(strategy="standard", epochs=1, batch_size=8)
    train(sn, space, enc, cfg, tmp_path, progress=False)
    (tmp_path / "last" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "last", sn.model)


def test_evaluator_cache_and_mask_equals_slice(tokenizer):
    from toolchain.core.data import get_task

    sn, space, enc = _setup(tokenizer)
    sn.model.eval()
    ev = Evaluator(sn, enc, get_task("sst2"), batch_size=5, param_count=space.num_parameters)
    subnet = SubNetwork(heads=(2, 0, 4), units=(10, 3, 0))
    assert abs(ev.logits(subnet, "mask") - ev.logits(subnet, "slice")).max() < 1e-5
    first = ev(subnet)
    assert ev.calls == 1 and 0.0 <= first["error"] <= 1.0
    assert ev(subnet) == first and ev.calls == 1  # cached


def test_evaluator_store_is_reused_across_runs(tokenizer, tmp_path):
    from toolchain.core.data import get_task

    sn, space, enc = _setup(tokenizer)
    sn.model.eval()
    store = tmp_path / "evaluations" / "validation.jsonl"
    a, b = SubNetwork(heads=(2, 0, 4), units=(10, 3, 0)), SubNetwork(heads=(4, 4, 4), units=(48, 48, 0))
    ev = Evaluator(sn, enc, get_task("sst2"), batch_size=5, store=store)
    first = ev(a)
    with open(store, "a") as f:
        f.write('{"key": "interrupted mid-wri')  # a run killed while appending
    again = Evaluator(sn, enc, get_task("sst2"), batch_size=5, store=store)
    assert again(a) == first and again.calls == 0  # from the store, no forward pass
    again(b)
    assert again.calls == 1 and len(store.read_text().splitlines()) == 3
    other = {k: v[:7] for k, v in enc.items()}  # another subset size: the stored scores do not apply
    assert Evaluator(sn, other, get_task("sst2"), batch_size=5, store=store).cache == {}


def test_evaluator_in_bf16_scores_like_fp32(tokenizer):
    """bfloat16 autocast (the search's evaluations where the CPU has native bf16) gives the logits of float32 to
    bf16 precision (test_compile: its scores are stored apart from float32 ones)."""
    from toolchain.core.data import get_task
    from toolchain.evaluation import resolve_dtype
    from toolchain.options import CompileError, CompileOptions

    sn, space, enc = _setup(tokenizer)
    sn.model.eval()
    subnet = SubNetwork(heads=(2, 0, 4), units=(10, 3, 0))
    fp32 = Evaluator(sn, enc, get_task("sst2"), batch_size=5).logits(subnet)
    bf16 = Evaluator(sn, enc, get_task("sst2"), batch_size=5, dtype="bf16").logits(subnet)
    assert not (fp32 == bf16).all() and abs(fp32 - bf16).max() < 0.05 * (1 + abs(fp32).max())
    assert resolve_dtype("auto") in ("fp32", "bf16") and resolve_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match="fp32 or bf16"):
        resolve_dtype("fp16")
    with pytest.raises(CompileError, match="fp32 or bf16"):
        CompileOptions(search_dtype="int4")


@pytest.mark.slow
def test_train_run_and_cli_evaluate_on_real_data(tiny_model_dir, data_dir, tmp_path, capsys):
    from toolchain.cli import main
    from toolchain.run import DataSettings, RunError, load_run, train_run

    from toolchain.core.modeling import ModelLoadError

    data = DataSettings(task="sst2", data_dir=str(data_dir), max_train_samples=48)
    with pytest.raises(ModelLoadError, match="--max-length 100000 is out of range: this model takes 1 to 130"):
        train_run(tmp_path / "bad", model=str(tiny_model_dir), data=DataSettings(**{**data.to_dict(), "max_length": 100000}))
    with pytest.raises(ModelLoadError, match="model folder not found"):
        train_run(tmp_path / "bad", model=str(tmp_path / "typo"), data=data)
    assert not (tmp_path / "bad").exists()  # nothing created for a bad input
    run = train_run(tmp_path / "run", model=str(tiny_model_dir), data=data,
                    train_config=TrainConfig(strategy="sandwich", epochs=1, batch_size=16), init="pretrained",
                    progress=False)
    assert run.supernet.model.config.id2label == {0: "negative", 1: "positive"}  # SST-2's label names
    assert (tmp_path / "run" / "supernet" / "model.safetensors").exists()
    assert (tmp_path / "run" / "importance.json").exists()
    again = load_run(tmp_path / "run")
    assert again.space.num_parameters(again.supernet.full()) == sum(p.numel() for p in run.supernet.model.parameters())
    rc = main(["evaluate", str(tmp_path / "run"), "--subnet", '{"heads":[4,2,0],"units":[48,10,0]}',
               "--max-eval-samples", "40"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 40 and 0 <= out["accuracy"] <= 1
    with pytest.raises(RunError, match="other settings"):
        train_run(tmp_path / "run", model=str(tiny_model_dir), data=data,
                  train_config=TrainConfig(strategy="sandwich", epochs=2, batch_size=16), init="pretrained",
                  progress=False)


@pytest.mark.slow
def test_train_run_can_start_from_a_fine_tuned_model(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import toolchain.run as run_mod
    from toolchain.run import DataSettings, RunError, load_run, train_run

    loaded = []
    real_load = run_mod.load_model

    def spy(name_or_path, **kw):
        loaded.append(name_or_path)
        return real_load(name_or_path, **kw)

    monkeypatch.setattr(run_mod, "load_model", spy)
    data = DataSettings(task="sst2", data_dir=str(data_dir), max_train_samples=32)
    cfg = TrainConfig(strategy="kd", epochs=1, batch_size=16)
    run = train_run(tmp_path / "run", model=str(tiny_model_dir), data=data, train_config=cfg, init="finetuned",
                    progress=False)
    base = load_run(tmp_path / "run" / "finetuned")
    assert base.settings["train"]["strategy"] == "standard" and base.settings["reorder"] is False
    assert base.settings["train"]["epochs"] == cfg.epochs and base.settings["model"] == str(tiny_model_dir)
    # the fine-tuning starts from the pre-trained model, the super-network from the fine-tuned one
    assert loaded == [str(tiny_model_dir), str(base.folder / "supernet")]
    assert run.settings["init"] == "finetuned" and run.settings["train_stats"]["finetune_seconds"] >= 0
    # a finished run is reused; the same folder with the other init is another run
    assert train_run(tmp_path / "run", model=str(tiny_model_dir), data=data, train_config=cfg, init="finetuned",
                     progress=False).folder == run.folder
    with pytest.raises(RunError, match="other settings"):
        train_run(tmp_path / "run", model=str(tiny_model_dir), data=data, train_config=cfg, init="pretrained",
                  progress=False)
    with pytest.raises(RunError, match="only fine-tunes"):
        train_run(tmp_path / "other", model=str(tiny_model_dir), data=data,
                  train_config=TrainConfig(strategy="standard"), init="finetuned", progress=False)
    with pytest.raises(RunError, match="unknown init"):
        train_run(tmp_path / "other", data=data, init="distilled", progress=False)


def test_python_api_defaults_are_the_clis():
    """``TrainConfig()`` and ``train_run()`` without arguments train what ``nasprune train`` trains."""
    import inspect

    from toolchain.cli import build_parser
    from toolchain.run import default_init, train_run

    args = build_parser().parse_args(["train", "-o", "somewhere"])
    assert TrainConfig().strategy == args.strategy == "kd"
    assert inspect.signature(train_run).parameters["init"].default is None  # resolved by the strategy, as the CLI
    assert default_init(TrainConfig().strategy) == "finetuned"


@pytest.mark.slow
def test_train_run_is_the_same_whatever_ran_before_it(tiny_model_dir, tmp_path):
    """A fresh head (here: a regression head replacing the saved 2-label one) comes from the run's seed, not from
    whatever state earlier work in the process left torch's generator in (the compile's profile stage draws from it
    before training): two trainings with the same settings give the same weights."""
    import csv

    from safetensors.torch import load_file

    from toolchain.run import DataSettings, train_run

    rows = [(f"{'good fine' if i % 2 else 'bad dull'} film {i}", f"{(i % 5):.1f}") for i in range(24)]
    for name in ("train.csv", "val.csv"):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([("sentence", "label"), *rows])
    data = DataSettings(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "val.csv"),
                        regression=True, max_length=16)
    weights = []
    for i, draw in enumerate((1, 1000)):
        torch.manual_seed(123)
        torch.rand(draw)  # earlier work that drew a different amount from the global generator
        train_run(tmp_path / f"run{i}", model=str(tiny_model_dir), data=data, reorder=False, progress=False,
                  train_config=TrainConfig(strategy="standard", epochs=1, batch_size=8))
        weights.append(load_file(tmp_path / f"run{i}" / "supernet" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_optimizer_is_fused_adamw_and_steps_like_the_per_tensor_one(tokenizer):
    """AdamW runs as one fused kernel (torch's default on a CPU loops over the tensors: slower,
    benchmarks/bench_optimizer.py) and moves the weights as that loop does; biases and LayerNorm are not decayed."""
    from toolchain.training import optimizer_and_schedule

    sn, _, enc = _setup(tokenizer)
    models = [sn.model, model_from_config(sn.model.config)]
    models[1].load_state_dict(sn.model.state_dict())
    before = sn.model.classifier.weight.detach().clone()
    opts = [optimizer_and_schedule(models[0], 1e-3, 0.01, 0.1, 5)[0],
            optimizer_and_schedule(models[1], 1e-3, 0.01, 0.1, 5, fused=False)[0]]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"] and opts[1].defaults["foreach"] is False
    assert [g["weight_decay"] for g in opts[0].param_groups] == [0.01, 0.0]
    no_decay = {id(p) for p in opts[0].param_groups[1]["params"]}
    assert all((id(p) in no_decay) == (n.endswith("bias") or "LayerNorm" in n) for n, p in models[0].named_parameters())
    for _ in range(3):
        for m, o in zip(models, opts):
            m.train()
            torch.manual_seed(0)
            m(**enc).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert not torch.allclose(models[0].classifier.weight, before, atol=1e-4)  # and they did move
