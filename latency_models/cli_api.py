"""What ``nasprune-profile`` (toolchain/cli.py) calls, and where tables are cached.

    run_profile(target="cpu", model=None, precision=None, out=None, bundle=None, unit_step=128,
                calibrate_samples=10, validate_samples=10, resume=True) -> Path

* ``bundle`` set: write a profiling bundle for a device without torch into that folder (nothing is measured
  here) and return the folder; on the device ``python run_profile.py --out table.json``.
* otherwise: profile here, calibrate and validate on random MEDIUM sub-networks, write the table to ``out`` or to
  :func:`default_table_path` and return its path.
"""

from __future__ import annotations

import os
from pathlib import Path

from targets import Target, fingerprint_key, load_target


def cache_dir() -> Path:
    """``$NASPRUNE_CACHE/tables`` or ``~/.cache/nasprune/tables``."""
    root = os.environ.get("NASPRUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "nasprune"
    return base / "tables"


def dims_key(dims) -> str:
    """A readable key of the widths a table depends on (layers do not matter: blocks are per layer)."""
    d = dims.to_dict() if hasattr(dims, "to_dict") else dict(dims)
    return f"{d['model_type']}-h{d['hidden_size']}-a{d['num_heads']}-i{d['intermediate_size']}-v{d['vocab_size']}"


def default_table_path(target: Target | str, precision: str | None, dims) -> Path:
    """Where the table of ``dims`` on ``target`` at ``precision`` (on this machine) is cached:
    ``<cache>/tables/<fingerprint_key>-<dims key>.json``."""
    t = target if isinstance(target, Target) else load_target(target)
    fp = t.fingerprint(t.check_precision(precision))
    return cache_dir() / f"{fingerprint_key(fp)}-{dims_key(dims)}.json"


def find_table(target: Target | str, precision: str | None, dims):
    """The cached :class:`LatencyTable` for this target / precision / model on this machine, or ``None``."""
    from .lookup_table import LatencyTable

    p = default_table_path(target, precision, dims)
    return LatencyTable.load(p) if p.is_file() else None


def run_profile(target: str, model: str | None = None, precision: str | None = None, out: str | None = None,
                bundle: str | None = None, unit_step: int = 128, calibrate_samples: int = 10,
                validate_samples: int = 10, resume: bool = True, progress: bool = True) -> Path:
    """Profile ``model``'s blocks (default: all-MiniLM-L6-v2) on ``target`` (name or TOML path) at ``precision``
    (default: the target's first). Returns the table path, or the bundle folder when ``bundle`` is given."""
    from toolchain.modeling import ModelDims, load_config

    from .profile import profile, write_bundle

    t = load_target(target)
    precision = t.check_precision(precision)
    _, config = load_config(model)
    dims = ModelDims.from_config(config)
    if bundle:
        return write_bundle(dims, t, precision, bundle, model_config=config, unit_step=unit_step, progress=progress)
    out_path = Path(out) if out else default_table_path(t, precision, dims)
    model_obj = None
    if calibrate_samples or validate_samples:
        # random weights of the real architecture: values do not change latency or memory
        import torch

        from toolchain.modeling import model_from_config

        from .profile import config_for

        torch.manual_seed(0)
        model_obj = model_from_config(config_for(dims, config)).eval()
    table = profile(dims, t, precision, out_path, model_config=config, unit_step=unit_step, progress=progress,
                    resume=resume, model=model_obj, calibrate_samples=calibrate_samples,
                    validate_samples=validate_samples)
    if progress:
        print(table.summary())
    return Path(table.path)
