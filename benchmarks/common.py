"""Helpers shared by the benchmark scripts: data location, figure statistics, writing docs/benchmarks.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def data_dir() -> str:
    d = os.environ.get("NASPRUNE_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "glue")
    if not Path(d, "SST-2", "train.tsv").is_file():
        sys.exit(f"GLUE data not found in {d}; set NASPRUNE_DATA_DIR")
    return d


def table_path(out_dir, dims, target_name: str, precision: str) -> Path:
    """Where ``bench_latency.py`` writes the latency table of a model family, target and precision."""
    return Path(out_dir) / f"{dims.model_type}-{dims.hidden_size}-{target_name}-{precision}.json"


def stats(values) -> dict:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1]}


def machine() -> str:
    import onnxruntime
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    DOCS.parent.mkdir(exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nEvery figure here is printed by a script in `benchmarks/`.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def markdown_table(columns: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    """The lines of a markdown table: ``columns`` as the header, ``rows`` as text (``right``: right-aligned
    column numbers)."""
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(columns))) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def publish(name: str, lines: list[str], write: bool = True) -> str:
    """Print a benchmark's markdown and (``write``) make it the ``name`` section of docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(name, text)
    return text
