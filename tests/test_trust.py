"""Issue 18, "trust": safe run folders (checks before any folder, a marker, atomic files), clear exits (user error in
one line, bug as a bug, nothing shipped is non-zero), where every figure was measured (a table from another device
gates on its predictions; the bundle measures exported points on the device and `nasprune export --measured` gates
on those), the super-network cache's lock and damaged caches. Real targets, tables, run folders and points."""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import QUICK_CPU
from targets import ProviderUnavailableError, load_target, same_device
from targets.session import architecture
from toolchain.cli import compile_main, main, profile_main

ROOT = Path(__file__).resolve().parents[1]
# a tiny random BERT, 64 training examples, the retraining-free method (no distillation): quick on 2 cores
FAST = ["--target", str(QUICK_CPU), "--preset", "quick", "--calibrate-samples", "3", "--validate-samples", "3",
        "--max-train-samples", "64", "--search-eval-samples", "32", "--method", "rfp", "--rfp-samples", "32",
        "--export", "1", "--max-latency", "50ms"]
OTHER_DEVICE = {"cpu_model": "ARM Cortex-A76 (the test's device)", "machine": "aarch64", "physical_cores": 4}


@pytest.fixture(scope="module")
def glue():
    from conftest import glue_dir

    if glue_dir() is None:
        pytest.skip("GLUE data not found (../shared/data/glue or NASPRUNE_DATA_DIR)")
    return glue_dir()


@contextlib.contextmanager
def _environment(**values):
    """``os.environ`` with ``values`` set, for module-scoped fixtures (monkeypatch is per test)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, glue, shared_cache, tiny_model_dir):
    """``nasprune-compile --task nosuch -o X`` fails before any folder exists; the fixed command then runs as is."""
    out = tmp_path_factory.mktemp("runs") / "X"
    with _environment(NASPRUNE_CACHE=shared_cache, NASPRUNE_DATA_DIR=glue):
        bad = compile_main(["--model", str(tiny_model_dir), *FAST, "--task", "nosuch", "-o", str(out)])
        assert bad == 2 and not out.exists() and not out.with_name("X.partial").exists()
        rc = compile_main(["--model", str(tiny_model_dir), *FAST, "-o", str(out)])
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------------------ folders
@pytest.mark.parametrize("args,message", [
    (["--task", "nosuch"], "nosuch"),
    (["--model", "./no/such/model"], "not found"),
    (["--max-length", "100000"], "--max-length"),
    (["--target", "cpu", "--precision", "fp16"], "fp16"),
    (["--train-file", "t.csv", "--validation-file", "t.csv", "--text-columns", "nope"], "nope"),
    (["--executor", "local", "--workers", "3"], "--workers"),
    (["--objectives", "error,speed"], "speed"),
])
def test_every_input_is_checked_before_any_folder_exists(env, capsys, tiny_model_dir, args, message):
    (env / "t.csv").write_text("sentence,label\nfine,1\nbad,0\n")
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "-o", str(env / "X"), *args])
    assert rc == 2 and message in _one_error_line(capsys)
    assert sorted(p.name for p in env.iterdir()) == ["t.csv"]  # no X, no X.partial, no nasprune-out


def test_fixed_command_runs_without_resume_and_the_run_is_marked(compiled, shared_cache):
    assert not compiled.with_name("X.partial").exists()
    marker = json.loads((compiled / ".nasprune-run").read_text())
    assert marker["format"] == "nasprune-run" and marker["version"] == 1 and marker["kind"] == "compile"
    supernets = [p for p in (shared_cache / "supernets").iterdir() if p.is_dir()]
    assert supernets and all((p / ".nasprune-run").is_file() for p in supernets)  # train_run marks its folders
    assert not list(compiled.rglob("*.tmp"))  # every run file was written through a rename


def test_overwrite_refuses_a_folder_nasprune_did_not_make(env, capsys, tiny_model_dir):
    mine = env / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "-o", str(mine), "--overwrite"])
    assert rc == 2 and "not a folder nasprune made" in _one_error_line(capsys)
    assert (mine / "notes.txt").read_text() == "my own file" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert not (env / "mine.partial").exists()


def test_nasprune_train_overwrite_refuses_an_unmarked_folder(env, capsys, tiny_model_dir):
    run = env / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": "another", "status": "trained"}))
    (run / "keep.txt").write_text("x")
    rc = main(["train", "--model", str(tiny_model_dir), "--max-train-samples", "8", "-o", str(run), "--overwrite"])
    assert rc == 2 and "not a folder nasprune made" in _one_error_line(capsys)
    assert (run / "keep.txt").is_file()


def test_one_atomic_json_writer(tmp_path):
    """Run files go through toolchain.core.atomic: a write that fails leaves the old file whole, and no product
    module writes JSON in place."""
    from toolchain.core.atomic import write_json_atomic
    from toolchain.ship import jsonfile

    assert jsonfile.write_json_atomic is write_json_atomic
    path = write_json_atomic(tmp_path / "run.json", {"status": "trained"})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"status": object()})
    assert json.loads(path.read_text()) == {"status": "trained"} and os.listdir(tmp_path) == ["run.json"]
    in_place = []
    for file in (ROOT / "toolchain").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write_text"
                    and node.args and "json.dumps" in ast.unparse(node.args[0])):
                in_place.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not in_place


# -------------------------------------------------------------------------------------------------------- exits
def test_every_error_class_of_ours_is_a_user_error():
    import importlib

    from toolchain.errors import USER_ERRORS

    classes = []
    for top in ("targets", "latency_models", "toolchain"):
        for file in (ROOT / top).rglob("*.py"):
            module = importlib.import_module(".".join(file.relative_to(ROOT).with_suffix("").parts).replace(
                ".__init__", ""))
            classes += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Exception)
                        and c.__module__ == module.__name__ and c.__name__.endswith("Error")]
    assert len(classes) >= 14
    assert [c.__name__ for c in classes if not issubclass(c, USER_ERRORS)] == []


def test_a_bug_is_reported_as_a_bug_with_the_traceback_under_v(compiled, env, capsys):
    broken = env / "broken"  # a run whose run.json lacks its data settings: load_run fails with a plain KeyError
    broken.mkdir()
    settings = json.loads((compiled / "run.json").read_text())
    del settings["data"]
    (broken / "run.json").write_text(json.dumps(settings))
    assert main(["evaluate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "internal error (KeyError" in err and "please report" in err and "Traceback" not in err
    assert main(["evaluate", str(broken), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "please report" in err


def test_a_user_error_is_one_line_with_the_traceback_only_under_v(env, capsys):
    assert main(["evaluate", str(env / "nowhere")]) == 2
    assert "not a nasprune run folder" in _one_error_line(capsys)
    assert main(["-v", "evaluate", str(env / "nowhere")]) == 2
    assert "Traceback" in capsys.readouterr().err


def _doctored_table(compiled: Path, dest: Path, **fingerprint) -> Path:
    """The compile's own latency table, predicting 0 MB for every sub-network (and, with ``fingerprint``, from
    another device)."""
    data = json.loads(Path(json.loads((compiled / "run.json").read_text())["compile"]["latency_table"]).read_text())
    data["calibration"]["memory"] = {"a": 0.0, "b": 0.0, "c": 0.0, "n": 0}
    data["fingerprint"].update(fingerprint)
    dest.write_text(json.dumps(data))
    return dest


def test_a_compile_that_ships_nothing_exits_non_zero_with_the_closest_points(compiled, env, capsys,
                                                                             tiny_model_dir):
    table = _doctored_table(compiled, env / "table.json")  # this machine: the gate is what the export measures
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--latency-table", str(table), "--max-memory",
                       "0.001MB", "-o", str(env / "none")])
    out, err = capsys.readouterr()
    assert rc == 3, err
    assert "no exported point meets the budget" in err and "measured memory" in err and "> max 0.001 MB" in err
    assert "(not shipped: measured memory" in out  # the closest points, in the table, with the reason
    manifest = json.loads((env / "none" / "manifest.json").read_text())
    assert manifest["num_feasible"] == 0 and all(p["measured_on_target"] for p in manifest["points"])


# --------------------------------------------------------------------------------------------- measured where
def test_targets_say_which_device_they_are(tmp_path):
    cpu = load_target("cpu").fingerprint()
    assert "gpu" not in cpu and cpu["machine"]
    cuda = load_target("cuda").fingerprint()  # the GPU's name (nvidia-ml-py, nvidia-smi), else "unknown GPU"
    assert cuda["provider"] == "CUDAExecutionProvider" and isinstance(cuda["gpu"], str) and cuda["gpu"]
    assert not same_device(cuda, {**cuda, "gpu": "another GPU"}) and same_device(cpu, {**cpu, "threads": 1})
    other = load_target("cpu").on_device({**cpu, **OTHER_DEVICE})
    assert not other.is_this_machine and other.fingerprint()["cpu_model"] == OTHER_DEVICE["cpu_model"]
    assert load_target("cpu").is_this_machine and other == load_target("cpu")


def test_a_target_of_another_architecture_is_refused_for_profiling(tmp_path, capsys):
    foreign = "x86_64" if architecture() == "aarch64" else "aarch64"
    toml = tmp_path / "board.toml"
    toml.write_text(f'name = "board"\nproviders = ["CPUExecutionProvider"]\narchitecture = "{foreign}"\n')
    target = load_target(toml)
    assert target.architecture == foreign
    with pytest.raises(ProviderUnavailableError, match=f"is an {foreign} device and this machine is"):
        target.check_host()
    assert profile_main(["--target", str(toml), "-o", str(tmp_path / "t.json")]) == 2
    err = _one_error_line(capsys)
    assert "nasprune-profile --target" in err and "--bundle DIR" in err and not (tmp_path / "t.json").exists()
    if architecture() != "aarch64":
        assert load_target("arm64").architecture == "aarch64"
        assert profile_main(["--target", "arm64"]) == 2 and "--bundle" in _one_error_line(capsys)


def test_a_compile_for_another_architecture_without_its_table_is_refused_first(env, capsys, tiny_model_dir):
    foreign = "x86_64" if architecture() == "aarch64" else "aarch64"
    (env / "board.toml").write_text(f'name = "board"\nproviders = ["CPUExecutionProvider"]\n'
                                    f'architecture = "{foreign}"\n')
    rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--target", str(env / "board.toml"), "-o", "Y"])
    assert rc == 2 and "--latency-table" in _one_error_line(capsys)
    assert not (env / "Y").exists() and not (env / "Y.partial").exists()


@pytest.fixture(scope="module")
def foreign_run(compiled, tmp_path_factory, shared_cache, glue, tiny_model_dir):
    """A compile with a latency table from another device, under a memory budget that only the table's
    predictions (0 MB) meet."""
    d = tmp_path_factory.mktemp("foreign")
    table = _doctored_table(compiled, d / "device-table.json", **OTHER_DEVICE)
    with _environment(NASPRUNE_CACHE=shared_cache, NASPRUNE_DATA_DIR=glue):
        rc = compile_main(["--model", str(tiny_model_dir), *FAST, "--latency-table", str(table), "--max-memory",
                           "0.001MB", "-o", str(d / "run")])
    return rc, d / "run"


def test_a_table_from_another_device_gates_on_its_predictions(foreign_run, capsys):
    rc, run = foreign_run
    assert rc == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["settings"]["measured_on_target"] is False
    shipped = [p for p in manifest["points"] if p["feasible"]]
    assert shipped and all(p["measured_on_target"] is False for p in shipped)
    info = json.loads((run / shipped[0]["path"] / "nasprune.json").read_text())
    assert info["measured_on_target"] is False and info["predicted"]["memory_mb"] == 0.0
    assert info["measured"]["memory_mb"] > 0.001  # this machine's figure: over the budget, yet not the gate
    assert info["target"]["fingerprint"]["cpu_model"] == OTHER_DEVICE["cpu_model"]
    assert "(here, not on the target)" in (run / "report.html").read_text()
    for figure in ("latency", "memory"):  # every measured figure says where it was measured: here
        here = info["measured"][figure]["measured_on"]
        assert here["cpu_model"] == load_target("cpu").fingerprint()["cpu_model"]
    from toolchain.cli import print_manifest

    print_manifest(manifest)
    assert "(not measured on the target)" in capsys.readouterr().out


def test_points_measured_on_the_device_are_read_back_and_gate(foreign_run, tmp_path, capsys, tiny_model_dir):
    """The bundle's runner measures the exported points (torch and nasprune unimportable, as on a device);
    `nasprune export RUN --measured` gates on those figures and marks the points measured on the target."""
    from latency_models.bundle import write_bundle
    from toolchain.core.modeling import ModelDims, load_config

    _, run = foreign_run
    config = load_config(str(tiny_model_dir))[1]
    bundle = write_bundle(ModelDims.from_config(config), load_target("cpu"), "fp32", tmp_path / "bundle",
                          model_config=config, unit_step=config.intermediate_size,
                          measurement={"warmup": 1, "min_reps": 3, "min_time_s": 0.0}, progress=False)
    block = tmp_path / "block"
    block.mkdir()
    for mod in ("torch", "toolchain", "latency_models", "targets", "transformers"):
        (block / f"{mod}.py").write_text(f"raise ImportError('{mod} must not be needed on the device')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(block)}
    r = subprocess.run([sys.executable, str(bundle / "run_profile.py"), "--measure-points", str(run), "--out",
                        str(tmp_path / "measured.json"), "--no-progress"], cwd=bundle, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    measured = json.loads((tmp_path / "measured.json").read_text())
    n_points = len(list(run.rglob("nasprune.json")))
    assert measured["format"] == "nasprune.measured_points" and len(measured["points"]) == n_points
    # this test's "device" is the one the table names: the figures come from there
    for p in measured["points"].values():
        for figure in ("latency", "memory"):
            p[figure]["measured_on"].update(OTHER_DEVICE)
    (tmp_path / "measured.json").write_text(json.dumps(measured))

    # the run's own budget (0.001 MB): measured on the device, nothing meets it
    assert main(["export", str(run), "--measured", str(tmp_path / "measured.json")]) == 3
    err = capsys.readouterr().err
    assert "no exported point meets the budget" in err and "measured memory" in err
    # a budget the device meets: shipped, measured on the target, the host's figures kept beside
    assert main(["export", str(run), "--measured", str(tmp_path / "measured.json"), "--max-memory", "100GB"]) == 0
    out = capsys.readouterr().out
    assert "not measured on the target" not in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["num_feasible"] >= 1 and all(p["measured_on_target"] for p in manifest["points"])
    info = json.loads((run / manifest["points"][0]["path"] / "nasprune.json").read_text())
    assert info["measured"]["memory"]["measured_on"]["cpu_model"] == OTHER_DEVICE["cpu_model"]
    assert info["measured_here"]["memory_mb"] > 0 and info["measured_on_target"] is True


# --------------------------------------------------------------------------------------------- caches and locks
def test_two_compiles_sharing_a_super_network_take_turns(compiled, env, caplog, tiny_model_dir, shared_cache):
    """While another process holds the super-network's lock, a compile waits for it (then uses the cached one)."""
    from toolchain.cli import _compile_options, add_compile_options
    from toolchain.pipeline import supernet_for

    parser = __import__("argparse").ArgumentParser()
    add_compile_options(parser)
    opts = _compile_options(parser.parse_args(["--model", str(tiny_model_dir), *FAST]))
    (folder,) = [p for p in (shared_cache / "supernets").iterdir() if p.is_dir()]
    holder = open(folder.with_name(folder.name + ".lock"), "a")  # another process's lock: a second open file
    fcntl.flock(holder, fcntl.LOCK_EX)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("run", supernet_for(opts)))
    with caplog.at_level(logging.WARNING):
        worker.start()
        deadline = time.time() + 120
        while "waiting for another nasprune process" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
        assert "waiting for another nasprune process" in caplog.text and worker.is_alive() and not result
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        worker.join(300)
    assert result["run"].folder == folder


def test_a_damaged_cached_table_names_the_file_to_delete(compiled, env, monkeypatch, shared_cache):
    from latency_models.cache import default_table_path
    from latency_models.lookup_table import TableError
    from toolchain.options import CompileOptions
    from toolchain.pipeline import load_run
    from toolchain.tables import latency_table_for

    run = load_run(compiled)
    cache = env / "cache"
    shutil.copytree(shared_cache / "tables", cache / "tables")
    monkeypatch.setenv("NASPRUNE_CACHE", str(cache))
    target = load_target("cpu")
    table = default_table_path(target, "fp32", run.supernet.dims)
    assert table.is_file()
    table.write_text(table.read_text()[:100])  # cut short, as by a full disk
    with pytest.raises(TableError, match=f"Delete {table}"):
        latency_table_for(CompileOptions(preset="quick"), target, "fp32", run.supernet.dims, run.supernet.config)


def test_a_damaged_cached_super_network_names_the_folder_to_delete(compiled, env, capsys, monkeypatch,
                                                                   shared_cache, tiny_model_dir):
    cache = env / "cache"
    shutil.copytree(shared_cache, cache)
    monkeypatch.setenv("NASPRUNE_CACHE", str(cache))
    (folder,) = [p for p in (cache / "supernets").iterdir() if p.is_dir()]
    (folder / "supernet" / "model.safetensors").write_bytes(b"not a tensor file")
    assert compile_main(["--model", str(tiny_model_dir), *FAST, "-o", str(env / "Z")]) == 2
    assert f"delete {folder}" in _one_error_line(capsys)
    assert not (env / "Z").exists() and not (env / "Z.partial").exists()  # the fixed command needs no --resume
