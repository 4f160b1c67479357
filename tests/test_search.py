"""The search engine on a tiny space with a cheap analytic ``evaluate`` (no model involved)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from toolchain.search.hypervolume import REFERENCE_POINT, hypervolume, knee_index
from toolchain.core.modeling import ModelDims
from toolchain.search import (
    HISTORY_COLUMNS,
    HistoryError,
    PruningProblem,
    SearchError,
    infeasible_message,
    mutate,
    run_search,
)
from toolchain.core.search_space import make_space

DIMS = ModelDims(model_type="bert", num_layers=4, num_heads=4, head_size=8, hidden_size=32, intermediate_size=64,
                 vocab_size=100, num_labels=2)
IMPORTANCE = np.array([1.0, 0.2, 0.8, 0.1, 0.5, 0.3])  # per layer: how much the error depends on it


def medium():
    return make_space("medium", DIMS, fixed_params=1000)


def make_evaluate(space, calls=None, interrupt_after=None):
    """error falls with (importance-weighted) capacity, plus seeded noise; latency grows with heads and units."""
    d = space.dims

    def evaluate(subnet):
        if calls is not None:
            if interrupt_after is not None and len(calls) >= interrupt_after:
                raise KeyboardInterrupt
            calls.append(subnet.key())
        h = np.array(subnet.heads) / d.num_heads
        u = np.array(subnet.units) / d.intermediate_size
        capacity = float((IMPORTANCE[: d.num_layers] * (h + u)).sum())
        noise = np.random.default_rng(int(subnet.key()[:8], 16)).random()
        return {
            "error": 0.1 + 0.6 * np.exp(-capacity) + 0.01 * noise,
            "latency": 1.0 + 0.5 * sum(subnet.heads) + 0.03 * sum(subnet.units),
            "memory": 10.0 + 0.1 * sum(subnet.units),
            "params": space.num_parameters(subnet),
        }

    return evaluate


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("time", "eval_seconds")} for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------ hypervolume
def test_hypervolume_fixed_normalisation():
    # one point at (0.5 error, 50ms of a 100ms unpruned network): (1.1-0.5)*(1.1-0.5)
    hv = hypervolume([[0.5, 50.0]], ["error", "latency"], {"latency": 100.0})
    assert hv == pytest.approx(0.36)
    # points beyond the reference point add nothing; dominated points add nothing
    assert hypervolume([[0.5, 50.0], [0.6, 60.0], [0.1, 200.0]], ["error", "latency"], {"latency": 100.0}) == \
        pytest.approx(0.36)
    assert hypervolume(np.empty((0, 2)), ["error", "latency"], {"latency": 1.0}) == 0.0
    with pytest.raises(ValueError, match="latency"):
        hypervolume([[0.5, 50.0]], ["error", "latency"], {})
    assert REFERENCE_POINT == 1.1


def test_knee_is_farthest_from_the_chord():
    front = [[0.0, 1.0], [0.2, 0.3], [0.5, 0.2], [1.0, 0.0]]
    assert knee_index(front) == 1
    assert knee_index([[0.3, 0.3]]) == 0
    assert knee_index([]) is None


# ------------------------------------------------------------------------------------------------ problem
def test_problem_caches_duplicates():
    space = medium()
    calls = []
    problem = PruningProblem(space, make_evaluate(space, calls), objectives=("error", "latency"),
                             constraints={"latency": 5.0})
    X = np.array([space.encode(space.largest()), space.encode(space.smallest()), space.encode(space.largest())])
    out = problem.evaluate(X, return_as_dictionary=True)
    assert out["F"].shape == (3, 2) and out["G"].shape == (3, 1)
    assert len(calls) == 2  # the duplicate came from the cache
    assert out["G"][1, 0] < 0 < out["G"][0, 0]  # smallest is feasible, largest is not


# ------------------------------------------------------------------------------------------------ run_search
@pytest.mark.parametrize("method", ["nsga2", "random", "local"])
def test_constraints_budget_and_no_duplicates(method, tmp_path):
    space = medium()
    calls = []
    res = run_search(space, make_evaluate(space, calls), objectives=("error", "latency"),
                     constraints={"latency": 8.0, "memory": 18.0}, method=method, n_evals=60, pop_size=10,
                     seed=1, history_path=tmp_path, progress=False)
    assert len(res.records) == 60 and len(calls) == 60 and len(set(calls)) == 60
    assert res.pareto and res.knee in res.pareto
    for r in res.pareto:
        assert r["feasible"] and r["latency"] <= 8.0 and r["memory"] <= 18.0
    lat = [r["latency"] for r in res.pareto]
    assert lat == sorted(lat)
    err = [r["error"] for r in res.pareto]
    assert err == sorted(err, reverse=True)  # non-dominated: error falls as latency grows
    assert len(rows(tmp_path / "search_history.csv")) == 60
    assert res.normalizers["latency"] == make_evaluate(space)(space.largest())["latency"]
    saved = json.loads(res.save(tmp_path).read_text())
    assert (tmp_path / "pareto.json").is_file() and saved["hypervolume"] == res.hypervolume
    assert len(saved["pareto"]) == len(res.pareto) and saved["constraints"] == {"latency": 8.0, "memory": 18.0}


@pytest.mark.parametrize("method", ["nsga2", "random", "local"])
def test_interrupted_search_resumes_to_the_same_result(method, tmp_path):
    space = medium()
    n, k = 45, 17
    kw = dict(objectives=("error", "latency"), constraints={"latency": 8.0}, method=method, n_evals=n,
              pop_size=8, seed=3, progress=False)
    full = run_search(space, make_evaluate(space), history_path=tmp_path / "a", **kw)

    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_search(space, make_evaluate(space, calls, interrupt_after=k), history_path=tmp_path / "b", **kw)
    assert len(rows(tmp_path / "b" / "search_history.csv")) == k
    calls.clear()
    resumed = run_search(space, make_evaluate(space, calls), history_path=tmp_path / "b", **kw)
    assert len(calls) == n - k
    assert resumed.n_from_history == k and resumed.n_new == n - k
    assert rows(tmp_path / "a" / "search_history.csv") == rows(tmp_path / "b" / "search_history.csv")
    assert resumed.hypervolume == full.hypervolume
    assert [r["key"] for r in resumed.pareto] == [r["key"] for r in full.pareto]
    assert resumed.knee["key"] == full.knee["key"]


def test_resume_drops_a_cut_off_last_line(tmp_path):
    space = medium()
    kw = dict(method="random", n_evals=10, seed=0, progress=False, history_path=tmp_path)
    run_search(space, make_evaluate(space), **{**kw, "n_evals": 5})
    path = tmp_path / "search_history.csv"
    path.write_text(path.read_text()[:-7])  # killed while writing the 5th row
    calls = []
    res = run_search(space, make_evaluate(space, calls), **kw)
    assert len(calls) == 6 and len(res.records) == 10 and len(rows(path)) == 10


@pytest.mark.parametrize("content, match", [
    ("a,b,c\n1,2,3\n", "unexpected header"),
    (",".join(HISTORY_COLUMNS) + "\n0,abc,not json,,,,,1,0.0,,0.0,0.0\n", "line 2"),
    (",".join(HISTORY_COLUMNS) + "\n5,x\n", "line 2"),
])
def test_corrupt_history_names_the_file(tmp_path, content, match):
    path = tmp_path / "search_history.csv"
    path.write_text(content)
    space = medium()
    with pytest.raises(HistoryError, match=match) as e:
        run_search(space, make_evaluate(space), n_evals=5, history_path=path, progress=False)
    assert str(path) in str(e.value)


def test_history_of_another_space_is_refused(tmp_path):
    other = make_space("medium", ModelDims("bert", 2, 4, 8, 32, 64, 100, 2))
    run_search(other, make_evaluate(other), n_evals=3, method="random", history_path=tmp_path, progress=False)
    space = medium()
    with pytest.raises(HistoryError, match="search_history.csv, line 2"):
        run_search(space, make_evaluate(space), n_evals=3, history_path=tmp_path, progress=False)


HV_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
from test_search import medium, make_evaluate
from toolchain.search import run_search
s = medium()
print(repr(run_search(s, make_evaluate(s), method="nsga2", n_evals=60, pop_size=10, seed=7, progress=False).hypervolume))
"""


def test_hypervolume_reproducible_across_runs_and_processes():
    space = medium()
    a = run_search(space, make_evaluate(space), method="nsga2", n_evals=60, pop_size=10, seed=7, progress=False)
    b = run_search(space, make_evaluate(space), method="nsga2", n_evals=60, pop_size=10, seed=7, progress=False)
    c = run_search(space, make_evaluate(space), method="nsga2", n_evals=60, pop_size=10, seed=8, progress=False)
    assert a.hypervolume == b.hypervolume > 0
    assert [r["key"] for r in a.records] == [r["key"] for r in b.records]
    assert [r["key"] for r in a.records] != [r["key"] for r in c.records]
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", HV_SCRIPT.format(tests=str(Path(__file__).parent))],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == a.hypervolume


def test_nsga2_beats_random_search_with_the_same_budget():
    space = medium()
    evaluate = make_evaluate(space)
    wins = 0
    for seed in range(3):
        kw = dict(objectives=("error", "latency"), n_evals=300, pop_size=20, seed=seed, progress=False)
        ga = run_search(space, evaluate, method="nsga2", **kw)
        rs = run_search(space, evaluate, method="random", **kw)
        wins += ga.hypervolume > rs.hypervolume
    assert wins == 3


@pytest.mark.parametrize("name", ["large", "layer"])
def test_boolean_spaces(name):
    dims = ModelDims("bert", 3, 2, 8, 16, 8, 100, 2)
    space = make_space(name, dims)
    calls = []
    res = run_search(space, make_evaluate(space, calls), objectives=("error", "params"), method="nsga2",
                     n_evals=40, pop_size=8, seed=0, progress=False)
    expected = min(40, 2 ** space.n_var)  # LAYER has only 8 members: the search stops when it is exhausted
    assert len(res.records) == len(calls) == len(set(calls)) == expected
    assert res.pareto and res.hypervolume > 0
    if name == "layer":
        assert "every member" in res.stop_reason
    x = space.encode(res.records[-1]["subnet"])
    assert x.dtype == bool and space.decode(x) == res.records[-1]["subnet"]


def test_local_search_mutates_one_variable():
    space = medium()
    rng = np.random.default_rng(0)
    s = space.largest()
    for _ in range(20):
        t = mutate(space, s, rng)
        assert (space.encode(t) != space.encode(s)).sum() == 1
        s = t


def test_infeasible_constraint_returns_closest_points():
    space = medium()
    res = run_search(space, make_evaluate(space), objectives=("error", "latency"), constraints={"latency": 0.5},
                     method="random", n_evals=30, seed=0, progress=False)
    assert res.feasible == [] and res.pareto == [] and res.knee is None and res.hypervolume == 0.0
    closest = res.closest(3)
    assert len(closest) == 3
    assert closest[0]["latency"] == min(r["latency"] for r in res.records)
    msg = infeasible_message(res)
    assert msg.startswith("no sub-network meets --max-latency 0.5ms") and "closest" in msg
    assert json.loads(res.to_json())["closest"][0]["key"] == closest[0]["key"]


def test_bad_arguments():
    space = medium()
    ev = make_evaluate(space)
    with pytest.raises(SearchError, match="objective"):
        run_search(space, ev, objectives=("accuracy",), progress=False)
    with pytest.raises(SearchError, match="constraint"):
        run_search(space, ev, constraints={"energy": 1.0}, progress=False)
    with pytest.raises(SearchError, match="method"):
        run_search(space, ev, method="bo", progress=False)
    with pytest.raises(SearchError, match="memory"):
        run_search(space, lambda s: {"error": 0.1, "latency": 1.0}, objectives=("error", "memory"), n_evals=2,
                   progress=False)


def test_time_budget_and_given_normalizers():
    space = medium()
    calls = []
    res = run_search(space, make_evaluate(space, calls), objectives=("error", "latency"), n_evals=10_000,
                     max_seconds=0.3, normalizers={"latency": 40.0}, method="random", seed=0, progress=False)
    assert 0 < len(res.records) < 10_000 and "max_seconds" in res.stop_reason
    assert res.normalizers == {"latency": 40.0}
    assert space.largest().key() not in calls[:1]  # no reference evaluation when normalizers are given


@pytest.mark.parametrize("name", ["small", "medium", "large", "layer"])
def test_first_generation_spans_the_latency_range(name):
    """NSGA-II starts from a ladder of shrunk networks (the full one first) plus seeded random ones, so even a
    one-generation search has points from the full network down to a small one."""
    from toolchain.search import initial_population, ladder

    space = make_space(name, DIMS)
    steps = ladder(space, 5)
    same = lambda a, b: (a.heads, a.units) == (b.heads, b.units)  # noqa: E731 (LARGE decodes explicit indices)
    assert same(steps[0], space.largest())
    assert all(same(space.decode(space.encode(s)), s) for s in steps)
    sizes = [space.num_parameters(s) for s in steps]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    X = initial_population(space, 10, seed=3)
    assert X.shape == (10, space.n_var)
    assert np.array_equal(X, initial_population(space, 10, seed=3))
    res = run_search(space, make_evaluate(space), objectives=("error", "latency"), method="nsga2", n_evals=10,
                     pop_size=10, seed=3, progress=False)
    lat = [r["latency"] for r in res.records]
    full = make_evaluate(space)(space.largest())["latency"]
    assert max(lat) == full and min(lat) < 0.5 * full
