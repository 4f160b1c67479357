"""nasprune-compile end to end on a tiny model and a real-data slice; bad input; no overwrite; resume after SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK_CPU
from toolchain.cli import compile_main, main
from toolchain.units import BudgetError, parse_latency, parse_memory, parse_params

# budgets small enough for CI (2 cores): a tiny random BERT, 64 training examples, a few evaluations, a latency table
# calibrated and validated on 3 + 3 sub-networks (the session's first compile profiles it; the others find it cached)
FAST = ["--target", str(QUICK_CPU), "--preset", "quick", "--calibrate-samples", "3", "--validate-samples", "3",
        "--max-train-samples", "64", "--n-evals", "10", "--search-eval-samples", "32", "--export", "2",
        "--recover-samples", "64", "--selection-samples", "64"]


# ------------------------------------------------------------------------------------------------------ units
LOG_SCRIPT = """
import logging, sys
from toolchain.cli_logging import setup_logging
setup_logging(sys.argv[1] == "-v")
logging.getLogger("toolchain.tables").warning("a warning of nasprune's")
logging.getLogger("toolchain.recover").info("a progress message of nasprune's")
logging.getLogger("fusion_attention").warning("a warning of ONNX Runtime's optimizer")
logging.warning("a warning through the root logger")
logging.getLogger("onnx_model").error("an error of another library")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_shows_nasprunes_warnings_and_only_other_libraries_errors(verbose):
    """The CLI's logging, in a fresh interpreter as a user runs it: nasprune's warnings always (the root logger at
    ERROR once hid them all), its progress messages with -v, another library's messages from ERROR up."""
    err = subprocess.run([sys.executable, "-c", LOG_SCRIPT, "-v" if verbose else "-"], capture_output=True,
                         text=True, check=True).stderr
    assert "WARNING toolchain.tables: a warning of nasprune's" in err
    assert ("a progress message of nasprune's" in err) == verbose
    assert "optimizer" not in err and "root logger" not in err and "an error of another library" in err


@pytest.mark.parametrize("text,ms", [("20", 20.0), ("20ms", 20.0), ("0.02s", 20.0), (" 7.5 ms", 7.5), ("500us", 0.5)])
def test_latency_budgets(text, ms):
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["-5ms", "0ms", "abc", "", "20 parsecs", "nan", "inf"])
def test_bad_latency_budgets(text):
    with pytest.raises(BudgetError):
        parse_latency(text)


def test_memory_and_param_units():
    assert parse_memory("300MB") == 300 and parse_memory("1GB") == 1000
    assert parse_memory("1GiB") == pytest.approx(1073.741824) and parse_memory("512KB") == pytest.approx(0.512)
    assert parse_params("10M") == 1e7 and parse_params("500K") == 5e5 and parse_params("1234") == 1234
    for bad in ("-1M", "0", "10X"):
        with pytest.raises(BudgetError):
            parse_params(bad)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["--max-latency", "-5ms"], "positive"),
    (["--max-latency", "0ms"], "positive"),
    (["--max-latency", "abc"], "cannot read latency budget"),
    (["--max-memory", "12 parsecs"], "unit"),
    (["--calibrate-samples", "-1"], "--calibrate-samples must be 0 or more"),
    (["--validate-samples", "-2"], "--validate-samples must be 0 or more"),
    (["--target", "toaster"], "toaster"),
    (["--task", "imagenet"], "imagenet"),
    (["--model", "./no/such/model"], "not found"),
    (["--train-file", "missing.csv", "--validation-file", "missing.csv"], "missing.csv"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(env, capsys, args, message):
    rc = compile_main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (env / "nasprune-out").exists() or not any((env / "nasprune-out").glob("*[!l]"))


def test_missing_data_dir(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    rc = compile_main(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")])
    assert rc != 0 and "nowhere" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    rc = main(["train", "--model", str(tmp_path / "gpt2"), "-o", str(tmp_path / "run"), "--max-train-samples", "8"])
    err = capsys.readouterr().err
    assert rc != 0 and "unsupported architecture 'gpt2'" in err and "bert" in err and "roberta" in err


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_compile_end_to_end_then_no_overwrite_then_infeasible(env, tiny_model_dir, capsys):
    out = env / "out"
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--max-latency", "50ms", "-o", str(out)])
    printed = capsys.readouterr()
    printed = printed.out + printed.err
    assert rc == 0, printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_feasible"] >= 1
    for p in manifest["points"]:
        if p["feasible"]:
            assert p["measured_latency_ms"] <= 50
            folder = out / p["path"]
            assert {"model.onnx", "config.json", "nasprune.json", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    for name in ("pareto.png", "report.html", "search_history.csv", "pareto.json", "run.json"):
        assert (out / name).is_file(), name
    assert "unpruned" in printed and "shipped" in printed
    assert not out.with_name("out.partial").exists()
    # every exported point was recovered (distilled from the full network) and says its metric before and after;
    # so was the unpruned reference (the same training, so that the comparison is fair), whose int8 export, a
    # candidate, reuses that recovery like every int8 export reuses its fp32 export's; the shipped set is the Pareto
    # set across precisions
    ref = manifest["settings"]["unpruned"]
    ref_info = json.loads((out / ref["path"] / "nasprune.json").read_text())
    ref_rec = ref_info["extra"]["recovery"]
    assert ref_rec["examples"] == 64 and not ref_rec["cached"] and ref["metric_before_recovery"] == ref_rec["score_before"]
    # every export is scored on dev and 64 unused training examples, and chosen by that; dev alone beside it
    parts = ref_info["metric"]["parts"]
    assert parts["unused training"]["num_examples"] == 64 and ref_info["metric"]["num_examples"] == 64 + parts["dev"][
        "num_examples"] and ref["metric_dev"] == parts["dev"]["score"] and ref_info["metric"]["selection"]["asked"] == 64
    assert all(p["metric_dev"] is not None for p in manifest["points"])
    # no useless point: without an accuracy limit each shipped one keeps half the unpruned model's margin over a
    # constant prediction (the validation labels' majority class)
    sensible = ref["metric_constant"] + 0.5 * (ref["metric"] - ref["metric_constant"])
    assert ref["metric_sensible"] == (pytest.approx(sensible) if ref["metric"] > ref["metric_constant"] else None)
    assert all(p["metric"] >= (ref["metric_sensible"] or -1) for p in manifest["points"] if p["feasible"])
    recoveries = []
    for p in manifest["points"]:
        info = json.loads((out / p["path"] / "nasprune.json").read_text())
        rec = info["extra"].get("recovery")
        if max(info["subnetwork"]["heads"]) == 4 and min(info["subnetwork"]["units"]) == 48:  # the full network
            assert rec["cached"] and info["precision"] == "int8"
            continue
        assert rec["examples"] == 64 and rec["steps"] >= 1
        assert p["metric_before_recovery"] == rec["score_before"] and p["metric"] is not None
        recoveries.append((info["precision"], rec["cached"]))
    # (a sub-network is recovered before its export when its twins are, so its fp32 export may find it cached too)
    assert "fp32" in {p for p, _ in recoveries} and all(cached for precision, cached in recoveries if precision == "int8")
    assert {p["precision"] for p in manifest["points"]} == {"fp32", "int8"}
    # each chosen sub-network is tried in both precisions (an unpruned int8 candidate takes no slot of theirs)
    tried: dict = {}
    for p in manifest["points"]:
        tried.setdefault(json.dumps(p["subnetwork"], sort_keys=True), set()).add(p["precision"])
    full = json.dumps(ref_info["subnetwork"], sort_keys=True)
    assert [k for k in tried if k != full] and all(v == {"fp32", "int8"} for k, v in tried.items() if k != full)
    # --export 2 with the unpruned network shipping in int8: it is one of the two, so one sub-network is recovered
    assert tried[full] == {"int8"} and len(tried) == 2
    # the search placed each candidate in its fastest precision, with an int8 table of its own (profiled at the
    # target's length only), so every export carries a prediction of its own precision
    settings = manifest["settings"]
    assert settings["search_latency"] == "the fastest of fp32, int8"
    int8_table = json.loads(Path(settings["search_latency_tables"]["int8"]).read_text())
    assert int8_table["fingerprint"]["precision"] == "int8" and int8_table["validation"]
    # the target's table was calibrated on --calibrate-samples sub-networks (and the unpruned one), validated on
    # --validate-samples; the int8 table, for the search only, on a share of them (toolchain.tables.SIDE_SAMPLE_SHARE)
    own = json.loads(Path(settings["latency_table"]).read_text())
    assert own["calibration"]["latency"]["n"] == 3 + 1 and own["validation"]["latency"]["n"] == 3
    assert int8_table["calibration"]["latency"]["n"] == round(0.8 * 3) + 1
    assert all(p["predicted_latency_ms"] is not None for p in manifest["points"])
    assert manifest["not_exported"] == []  # (50 ms: every candidate within reach of the budget)
    # and is measured beside the unpruned network in its own precision, drift-corrected to its own table's speed
    for p in manifest["points"]:
        beside = json.loads((out / p["path"] / "nasprune.json").read_text())["measured"]["reference"]
        own = int8_table if p["precision"] == "int8" else json.loads(Path(settings["latency_table"]).read_text())
        assert beside["model"] == ("unpruned (int8)" if p["precision"] == "int8" else "unpruned")
        assert beside["speed_ms"] == own["calibration"]["latency"]["reference_ms"]
    assert "<td>the unpruned network</td>" in (out / "report.html").read_text()  # its origin, not "search"
    # the search scored with bf16 autocast where this CPU has native bf16, in a store of its own
    from toolchain.evaluation import bf16_supported

    stores = [f.name for f in Path(os.environ["NASPRUNE_CACHE"]).rglob("evaluations/validation-32-seed0-*.jsonl")]
    assert stores and all(name.endswith("-bf16.jsonl") == bf16_supported() for name in stores)
    shipped = [(p["metric"], p["measured_latency_ms"]) for p in manifest["points"] if p["feasible"]]
    assert not any(o != s and o[0] >= s[0] and o[1] <= s[1] for s in shipped for o in shipped)  # none dominated
    html = (out / "report.html").read_text()
    assert "before recovery" in html
    assert re.search(r"Unpruned model: [^<]* metric \d\.\d{4} \(\d\.\d{4} before recovery\)", html)

    # the same points again (nasprune export over the run folder): their recovery comes from the cache
    assert main(["export", str(out), "--max-latency", "50ms", "--export", "2", "--recover-samples", "64",
                 "--selection-samples", "64"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    first = {(json.dumps(p["subnetwork"], sort_keys=True), p["precision"]): p for p in manifest["points"]}
    for p in again["points"]:
        info = json.loads((out / p["path"] / "nasprune.json").read_text())
        rec = info["extra"].get("recovery")
        assert rec is None or rec["cached"]
        # and so do their exports: the ONNX model, its verification and metric, kept beside the recovered weights;
        # only the latency at the target's length is measured again, beside the reference
        before = first.get((json.dumps(p["subnetwork"], sort_keys=True), p["precision"]))
        if before is not None:
            assert info["reused"]["export"].startswith(rec["cache"]) and p["metric"] == before["metric"]
            assert len(info["measured"]["latency"]["rounds_ms"]) == len(info["measured"]["reference"]["rounds_ms"])
            assert info["measured"]["memory_mb"] == before["measured_memory_mb"]
    assert json.loads((out / again["settings"]["unpruned"]["path"] / "nasprune.json").read_text())["reused"]
    assert all(p["reused"] for p in again["points"] if (json.dumps(p["subnetwork"], sort_keys=True), p["precision"])
               in first)
    assert "copied from the cache of their recovered points" in capsys.readouterr().out

    # a finished run is never overwritten without --overwrite
    before = (out / "manifest.json").read_text()
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--max-latency", "50ms", "-o", str(out)])
    assert rc != 0 and "--overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before

    # the stages work on their own over the same folder (super-network comes from the cache)
    assert main(["evaluate", str(out), "--max-eval-samples", "16"]) == 0
    capsys.readouterr()

    # an impossible budget: clear message with the closest points, non-zero exit, no output folder
    t = time.time()
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--max-latency", "0.0001ms", "-o", str(env / "x")])
    err = capsys.readouterr().err
    assert rc != 0 and "no sub-network meets --max-latency" in err and "closest" in err
    assert not (env / "x").exists()
    assert time.time() - t < 120  # caches (table, super-network) were reused


def test_compile_with_retraining_free_pruning(env, tiny_model_dir, capsys):
    """--method rfp: plain fine-tuning, one Kwon et al. mask per latency budget, rescaled weights exported."""
    out = env / "rfp"
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--method", "rfp", "--rfp-samples", "32",
                       "--max-latency", "50ms", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed + capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["method"] == "rfp" and manifest["settings"]["strategy"] == "standard"
    saved = json.loads((out / "rfp.json").read_text())
    assert 50.0 in {v["budget"] for v in saved.values()} and len(saved) >= 2
    assert any(s != 1.0 for v in saved.values() for row in v["scales"]["units"] for s in row)  # rescaled
    history = (out / "search_history.csv").read_text().splitlines()
    assert len(history) - 1 == len({json.dumps(v["subnetwork"], sort_keys=True) for v in saved.values()})
    shipped = [p for p in manifest["points"] if p["feasible"]]
    assert shipped and all(p["measured_latency_ms"] <= 50 for p in shipped)

    # the rfp stage again over the same folder: rfp.json and the history are read back, nothing is recomputed
    assert main(["search", str(out), "--method", "rfp", "--max-latency", "50ms"]) == 0
    assert (out / "search_history.csv").read_text().splitlines() == history

    # `nasprune export` over the finished run goes through the same stages 4-6: the same artifacts, report included
    for name in ("report.html", "pareto.png", "manifest.json"):
        (out / name).unlink()
    assert main(["export", str(out), "--max-latency", "50ms", "--export", "1"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert {"profile_s", "validate_s", "export_s", "total_s"} <= set(again["timings"])
    assert again["settings"]["method"] == "rfp" and again["settings"]["strategy"] == "standard"
    assert again["hypervolume"] == manifest["hypervolume"] and again["num_feasible"] == 1
    assert (out / "report.html").is_file() and (out / "pareto.png").is_file()


@pytest.mark.slow
def test_sigint_then_resume(env, tiny_model_dir):
    out = env / "run"
    cmd = [sys.executable, "-c", "import sys; from toolchain.cli import compile_main; sys.exit(compile_main())",
           "--model", str(tiny_model_dir), *FAST[:-4], "--n-evals", "400", "--search-eval-samples", "32",
           "--export", "1", "-o", str(out)]
    history = out.with_name("run.partial") / "search_history.csv"
    # Ctrl-C's signal as a terminal sends it, also when the tests run as a background job (which ignores SIGINT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) > 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    done = len(history.read_text().splitlines()) - 1
    assert done >= 4 and not out.exists()

    # without --resume the unfinished run is not silently replaced
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr

    resumed = subprocess.run(cmd[:3] + ["--resume"] + cmd[3:] + ["--n-evals", "24"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (out / "search_history.csv").read_text().splitlines()[1:]
    assert len(rows) == max(24, done)
    assert (out / "manifest.json").is_file()


def test_super_network_starts_from_a_fine_tuning_unless_the_strategy_is_one():
    from toolchain.options import CompileOptions

    assert CompileOptions().strategy == "kd" and CompileOptions().resolved_init() == "finetuned"
    assert CompileOptions(strategy="standard").resolved_init() == "pretrained"  # --method rfp prunes a fine-tuning
    assert CompileOptions(method="rfp").strategy == "standard"  # as nasprune-compile --method rfp
    assert CompileOptions(init="pretrained").resolved_init() == "pretrained"


def test_a_new_budget_starts_from_the_best_any_earlier_search_found(tokenizer, tmp_path):
    """Two searches of one super-network: under the second's tighter budget, its front is at least as good as the
    best point the first search scored under that budget (the evaluation store brings it back)."""
    import numpy as np
    import torch

    from toolchain.core.data import TASKS
    from toolchain.core.modeling import model_from_config, tiny_config
    from toolchain.core.search_space import fixed_parameters, make_space
    from toolchain.core.supernet import SuperNetwork
    from toolchain.evaluation import Evaluator, SearchObjective
    from toolchain.pipeline import with_earlier_points
    from toolchain.search import run_search

    torch.manual_seed(0)
    sn = SuperNetwork(model_from_config(tiny_config("bert", vocab_size=tokenizer.vocab_size)))
    space = make_space("medium", sn.dims, fixed_parameters(sn.model))
    texts = ["good", "bad movie", "a great film", "awful , boring", "fine", "not good at all", "superb", "meh"] * 4
    enc = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    enc["labels"] = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0] * 4)

    def costs(subnet):
        params = float(space.num_parameters(subnet))
        return {"latency": params / 1e4, "memory": 1.0, "params": params}

    store = tmp_path / "store.jsonl"
    first = run_search(space, SearchObjective(Evaluator(sn, enc, TASKS["sst2"], store=store), costs), n_evals=30,
                       seed=0, progress=False)
    budget = float(np.median([r["latency"] for r in first.records]))
    second_ev = Evaluator(sn, enc, TASKS["sst2"], store=store)  # a later compile: loads the store
    second = run_search(space, SearchObjective(second_ev, costs), constraints={"latency": budget}, n_evals=3, seed=5,
                        progress=False)
    front = with_earlier_points(second, second_ev, costs, space)
    best_earlier = min(r["error"] for r in first.records if r["latency"] <= budget)
    assert all(r["latency"] <= budget for r in front)
    assert min(r["error"] for r in front) <= best_earlier


@pytest.mark.slow
def test_accuracy_limit_ships_the_fastest_within_it_or_refuses_clearly(env, tiny_model_dir, capsys):
    out = env / "limited"
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--max-latency", "50ms", "--max-accuracy-drop", "40pt",
                       "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    floor = manifest["settings"]["unpruned"]["metric"] - 0.40
    assert manifest["settings"]["unpruned"]["metric_floor"] == pytest.approx(floor)
    shipped = [p for p in manifest["points"] if p["feasible"]]
    assert shipped and all(p["metric"] >= floor for p in shipped)
    for p in manifest["points"]:
        if not p["feasible"] and p["metric"] is not None and p["metric"] < floor:
            assert "accuracy limit" in p["infeasible_reason"]
    capsys.readouterr()

    # a limit nothing meets: one clear line with the closest points, non-zero exit, no finished folder
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--max-latency", "50ms", "--min-metric", "1.01",
                       "-o", str(env / "none")])
    err = capsys.readouterr().err
    assert rc != 0 and "accuracy limit 1.0100" in err and "closest" in err
    assert not (env / "none").exists()
