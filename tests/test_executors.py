"""Executors: the local one, and Ray on a local instance on 127.0.0.1 (2 CPUs, started once for the module).

What must hold: the same seed gives the same candidates, history and Pareto set on Ray as locally (for every
search method, and through ``nasprune search`` on a trained tiny super-network); only the driver writes the history
and the evaluation store; several targets are profiled as Ray tasks; a missing Ray is one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from toolchain.search.executors import ExecutorError, LocalExecutor, check_executor, make_executor
from toolchain.search import run_search

sys.path.insert(0, str(Path(__file__).parent))
from test_search import make_evaluate, medium, rows  # noqa: E402

NEEDS_RAY = "Ray is not installed (pip install 'nasprune[ray]')"


@pytest.fixture(scope="module")
def ray_instance():
    pytest.importorskip("ray", reason=NEEDS_RAY)
    from toolchain.search.executors import start_local_ray, stop_local_ray

    # the workers unpickle this module's test functions by reference
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), old_path) if p)
    try:
        # a private instance on 127.0.0.1, 2 CPUs; its one node is also the device of target "tiny-b"
        ray = start_local_ray(num_cpus=2, resources={"target:tiny-b": 1})
        yield ray
    finally:
        stop_local_ray()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@pytest.fixture(scope="module")
def ray_executor(ray_instance):
    from toolchain.search.executors import RayExecutor

    ex = RayExecutor(workers=2)  # joins the instance above (and leaves it running on close)
    yield ex
    ex.close()


class Slow:
    """Picklable: item i sleeps (n - i) * 10 ms, so later items finish first on parallel workers."""

    def __init__(self, n: int, fail_on: int | None = None):
        self.n, self.fail_on = n, fail_on

    def __call__(self, i: int):
        if i == self.fail_on:
            raise ValueError(f"boom at {i}")
        time.sleep((self.n - i) * 0.01)
        return i * i, os.getpid()


class Cached:
    def __call__(self, x):
        raise AssertionError("a cached item must not reach a worker")

    def cached(self, x):
        return -x


# ------------------------------------------------------------------------------------------------- executors
def test_local_pool_is_lazy_and_ordered():
    calls = []

    def fn(x):
        calls.append(x)
        return x + 1

    it = LocalExecutor().pool(fn).map([1, 2, 3])
    assert calls == []
    first = next(it)
    assert first[0] == 2 and first[1] >= 0 and calls == [1]
    assert [r for r, _ in it] == [3, 4]


def test_ray_pool_keeps_order_uses_all_workers_and_raises_the_tasks_error(ray_executor):
    with ray_executor.pool(Slow(8)) as pool:
        out = list(pool.map(range(8)))
        assert [r[0] for r, _ in out] == [i * i for i in range(8)]
        assert len({pid for (_, pid), _ in out}) == 2  # two actors shared the work
        assert os.getpid() not in {pid for (_, pid), _ in out}
        assert all(dt > 0 for _, dt in out)
    with ray_executor.pool(Slow(6, fail_on=3)) as pool:
        with pytest.raises(ValueError, match="boom at 3"):
            list(pool.map(range(6)))


def test_ray_pool_answers_cached_items_on_the_driver(ray_executor):
    pool = ray_executor.pool(Cached())
    assert [r for r, _ in pool.map([1, 2, 3])] == [-1, -2, -3]
    assert pool._actors == []  # no actor was started


def test_ray_run_tasks_with_custom_resources(ray_executor):
    assert ray_executor.local and "target:tiny-b" in ray_executor.resources()
    out = ray_executor.run(abs, [-1, -2, -3], resources=[None, {"target:tiny-b": 1}, None],
                           exclusive=[True, False, True])
    assert out == [1, 2, 3]


def test_missing_ray_is_one_clear_line(monkeypatch, capsys, tmp_path):
    from toolchain.cli import compile_main, main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'nasprune\[ray\]'"):
        make_executor("ray")
    rc = main(["search", str(tmp_path / "no-run"), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "pip install 'nasprune[ray]'" in err and len(err.splitlines()) == 1
    t = time.time()
    rc = compile_main(["--executor", "ray", "-o", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
    assert rc == 2 and "nasprune[ray]" in capsys.readouterr().err
    assert time.time() - t < 30 and not (tmp_path / "out").exists()  # before any training


def test_executor_options_are_checked():
    assert check_executor("local") == "local" and isinstance(make_executor(None), LocalExecutor)
    with pytest.raises(ExecutorError, match="--workers needs --executor ray"):
        make_executor("local", workers=2)
    with pytest.raises(ExecutorError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ExecutorError, match="at least 1"):
        check_executor("ray", workers=0)


# -------------------------------------------------------------------------------------- same seed, same result
@pytest.mark.parametrize("method,batch_size", [("nsga2", None), ("random", None), ("local", 4)])
def test_local_and_ray_give_the_same_pareto_set(ray_executor, tmp_path, method, batch_size):
    space = medium()
    kw = dict(objectives=("error", "latency"), constraints={"latency": 8.0}, method=method, n_evals=40,
              pop_size=8, seed=5, batch_size=batch_size, progress=False)
    local = run_search(space, make_evaluate(space), history_path=tmp_path / "local", **kw)
    on_ray = run_search(space, make_evaluate(space), history_path=tmp_path / "ray", executor=ray_executor, **kw)
    assert on_ray.executor == "ray" and on_ray.workers == 2 and local.executor == "local"
    assert [r["key"] for r in on_ray.records] == [r["key"] for r in local.records]
    assert [r["key"] for r in on_ray.pareto] == [r["key"] for r in local.pareto] != []
    assert on_ray.hypervolume == local.hypervolume
    assert rows(tmp_path / "ray" / "search_history.csv") == rows(tmp_path / "local" / "search_history.csv")


def test_search_interrupted_locally_resumes_on_ray(ray_executor, tmp_path):
    space = medium()
    kw = dict(objectives=("error", "latency"), method="nsga2", n_evals=36, pop_size=8, seed=2, progress=False)
    full = run_search(space, make_evaluate(space), **kw)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_search(space, make_evaluate(space, calls, interrupt_after=13), history_path=tmp_path, **kw)
    resumed = run_search(space, make_evaluate(space), history_path=tmp_path, executor=ray_executor, **kw)
    assert resumed.n_from_history == 13 and resumed.n_new == 36 - 13
    assert [r["key"] for r in resumed.records] == [r["key"] for r in full.records]
    assert [r["key"] for r in resumed.pareto] == [r["key"] for r in full.pareto]


# ------------------------------------------------------------------------------------- through nasprune search
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    from conftest import glue_dir

    from toolchain.cli import main

    from latency_models.cache import run_profile

    data = glue_dir()
    if data is None:
        pytest.skip("GLUE data not found (../shared/data/glue or NASPRUNE_DATA_DIR)")
    d = tmp_path_factory.mktemp("ray-search")
    rc = main(["train", "--model", str(tiny_model_dir), "--data-dir", str(data), "--max-train-samples", "64",
               "-o", str(d / "run")])
    assert rc == 0
    run_profile("cpu", model=str(tiny_model_dir), out=str(d / "table.json"), unit_step=48, calibrate_samples=0,
                validate_samples=0, measurement=FAST, progress=False)
    return d


def test_nasprune_search_on_ray_matches_local(ray_executor, trained_run, tmp_path, capsys):
    """The same trained run folder searched locally and on 2 Ray workers: identical history and pareto.json; the
    evaluation store (beside the super-network) is written by the driver alone, once per candidate."""
    from toolchain.cli import main

    args = ["--latency-table", str(trained_run / "table.json"), "--n-evals", "24", "--search-eval-samples", "48",
            "--max-latency", "50ms", "--preset", "quick"]
    runs = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--workers", "2"])):
        folder = tmp_path / name
        shutil.copytree(trained_run / "run", folder)
        assert main(["search", str(folder), *args, *extra]) == 0, capsys.readouterr()
        runs[name] = folder
    pareto = {n: json.loads((f / "pareto.json").read_text()) for n, f in runs.items()}
    assert pareto["ray"]["executor"] == "ray" and pareto["ray"]["workers"] == 2
    for key in ("pareto", "hypervolume", "knee", "n_evaluated"):
        assert pareto["ray"][key] == pareto["local"][key], key
    assert rows(runs["ray"] / "search_history.csv") == rows(runs["local"] / "search_history.csv")
    stores = {n: list((f / "evaluations").glob("*.jsonl")) for n, f in runs.items()}
    assert len(stores["ray"]) == 1
    lines = [json.loads(line) for line in stores["ray"][0].read_text().splitlines()]
    local_lines = {r["key"]: r for r in map(json.loads, stores["local"][0].read_text().splitlines())}
    assert len(lines) == len({r["key"] for r in lines}) == 24  # one line per candidate, nothing twice
    for r in lines:
        assert r["metrics"]["error"] == local_lines[r["key"]]["metrics"]["error"]


# ------------------------------------------------------------------------------------------ several targets
TARGET = """
name = "{name}"
providers = ["CPUExecutionProvider"]
sequence_length = {seq}
precisions = ["fp32"]
intra_op_threads = 1
"""
FAST = {"warmup": 1, "min_reps": 3, "min_time_s": 0.0, "max_reps": 3}


@pytest.fixture
def two_targets(tmp_path, monkeypatch):
    """Two CPU targets, a tiny model family (config only: 2 heads, 8 FFN units) and a fresh cache."""
    from toolchain.core.modeling import tiny_config

    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    tiny_config(hidden_size=16, num_attention_heads=2, intermediate_size=8, num_hidden_layers=2).save_pretrained(
        tmp_path / "tiny")
    for name, seq in (("tiny-a", 16), ("tiny-b", 24)):  # (targets alike in every setting share one table)
        (tmp_path / f"{name}.toml").write_text(TARGET.format(name=name, seq=seq))
    return [str(tmp_path / "tiny-a.toml"), str(tmp_path / "tiny-b.toml")], str(tmp_path / "tiny")


def test_profile_several_targets_as_ray_tasks(ray_executor, tmp_path, two_targets):
    """tiny-b is the device of a node (resource target:tiny-b): a parallel task there; tiny-a runs on this
    machine's node, alone."""
    from latency_models import LatencyTable
    from latency_models.cache import run_profiles

    targets, model = two_targets
    paths = run_profiles(targets, ray_executor, model=model, out_dir=str(tmp_path / "tables"), unit_step=8,
                         calibrate_samples=0, validate_samples=0, measurement=FAST, progress=False)
    assert [p.parent for p in paths] == [tmp_path / "tables"] * 2
    tables = [LatencyTable.load(p) for p in paths]
    assert [t.fingerprint["target"] for t in tables] == ["tiny-a", "tiny-b"]
    assert all(t.heads_grid == [0, 1, 2] and t.units_grid == [0, 8] for t in tables)
    # measured on this machine (one node): the tables are in its cache too, under the same names
    assert sorted(p.name for p in (tmp_path / "cache" / "tables").glob("*.json")) == sorted(p.name for p in paths)


def test_nasprune_profile_several_targets_locally(tmp_path, capsys, two_targets):
    from toolchain.cli import profile_main

    (a, b), model = two_targets
    assert profile_main(["--target", f"{a},{b}", "--output", str(tmp_path / "out.json")]) == 2
    assert "--output is a folder" in capsys.readouterr().err
    assert profile_main(["--target", a, "--target", b, "--bundle", str(tmp_path / "bundle")]) == 2
    assert "one --target" in capsys.readouterr().err
    rc = profile_main(["--target", a, "--target", b, "--model", model, "--unit-step", "8",
                       "--calibrate-samples", "0", "--validate-samples", "0", "-o", str(tmp_path / "tables")])
    out = capsys.readouterr().out
    assert rc == 0 and "tiny-a: written:" in out and "tiny-b: written:" in out
    assert len(list((tmp_path / "tables").glob("*.json"))) == 2
