"""The profiling bundle on an aarch64 Python with only numpy + onnxruntime, under qemu-user emulation.

Set up once with ``scripts/setup_aarch64_emulation.sh`` (Debian's qemu-user-static and debootstrap, Debian's arm64
Python, PyPI's aarch64 wheels); skipped with the reason where that is missing. Timings under emulation are not
latencies of any device: the test checks that the bundle runs there and that the table it writes is calibrated,
validated and accepted by ``nasprune-compile --latency-table``, not its figures.

Emulation is slow (5 to 15 minutes: 893 s on the 2-core machine on 2026-12-01), so these tests are marked
``emulation`` and left out of the default run: ``python -m pytest -m emulation``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from latency_models import LatencyTable
from toolchain.cli import compile_main, profile_main

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup_aarch64_emulation.sh"
pytestmark = pytest.mark.emulation


def _emulated_python() -> tuple[list[str], dict] | None:
    """The command prefix and environment of the emulated aarch64 Python, or ``None`` (skip) with the reason."""
    cache = Path(os.environ.get("NASPRUNE_CACHE") or Path.home() / ".cache" / "nasprune")
    d = Path(os.environ.get("NASPRUNE_AARCH64_DIR", cache / "aarch64"))
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        pytest.skip(f"no qemu-aarch64(-static) on PATH (apt-get install qemu-user-static; then {SETUP.name})")
    if not (d / "root" / "usr" / "bin" / "python3").exists() or not (d / "site" / "onnxruntime").is_dir():
        pytest.skip(f"no emulated aarch64 Python with onnxruntime in {d}: run scripts/{SETUP.name}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(d / "site")
    return [qemu, "-L", str(d / "root"), str(d / "root" / "usr" / "bin" / "python3")], env


@pytest.fixture(scope="module")
def device_table(tmp_path_factory, tiny_model_dir):
    """A bundle for target arm64 written by ``nasprune-profile --bundle``, run by the emulated aarch64 Python."""
    prefix, env = _emulated_python()
    d = tmp_path_factory.mktemp("aarch64")
    assert profile_main(["--target", "arm64", "--model", str(tiny_model_dir), "--precision", "fp32",
                         "--unit-step", "16", "--calibrate-samples", "4", "--validate-samples", "3",
                         "--bundle", str(d / "bundle")]) == 0
    check = subprocess.run(prefix + ["-c", "import platform, onnxruntime; print(platform.machine())"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.split()[-1] == "aarch64", check.stderr
    # torch and nasprune cannot be imported there: the bundle needs only numpy and onnxruntime
    r = subprocess.run(prefix + ["run_profile.py", "--out", str(d / "table.json"), "--no-progress"],
                       cwd=str(d / "bundle"), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "bundle", d / "table.json"


def test_the_bundle_runs_on_aarch64_and_its_table_is_calibrated_and_validated(device_table):
    bundle, path = device_table
    raw = json.loads(path.read_text())
    assert raw["fingerprint"]["machine"] == "aarch64" and raw["fingerprint"]["target"] == "arm64"
    assert raw["measurement"]["where"].startswith("bundle")
    table = LatencyTable.load(path)  # what nasprune does with it: fit the device's end-to-end measurements
    assert table.calibration["latency"]["n"] == 5 and "bundle" in table.calibration["latency"]["where"]
    assert table.validation["latency"]["n"] == 3 and table.validation["memory"]["n"] == 3
    assert len(table.latency_residuals()[0]) == 3
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 5e6, f"bundle of a tiny model is {size / 1e6:.1f} MB"


def test_compile_accepts_the_aarch64_table(device_table, env, tiny_model_dir, capsys):
    """``nasprune-compile --target arm64 --latency-table table.json`` on this x86_64 machine: the table is another
    device's, so points are verified and measured here, shipped by its predictions, marked not measured on the
    target."""
    _, path = device_table
    fast = ["--preset", "quick", "--max-train-samples", "64", "--search-eval-samples", "32", "--method", "rfp",
            "--rfp-samples", "32", "--export", "1", "--no-recover"]
    rc = compile_main(["--model", str(tiny_model_dir), *fast, "--target", "arm64", "--latency-table", str(path),
                       "--max-latency", "100000ms", "-o", str(env / "run")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    manifest = json.loads((env / "run" / "manifest.json").read_text())
    shipped = [p for p in manifest["points"] if p["feasible"]]
    assert shipped and all(p["measured_on_target"] is False for p in shipped)
    info = json.loads((env / "run" / shipped[0]["path"] / "nasprune.json").read_text())
    assert info["target"]["fingerprint"]["machine"] == "aarch64"
