"""What the command line shows of the log: nasprune's warnings and errors on stderr (with ``-v`` its progress
messages and debug lines too), another library's messages only from ERROR up."""

from __future__ import annotations

import logging

#: what -v adds to the default output (nasprune's warnings and errors, the progress bars, the results)
VERBOSE_HELP = "nasprune's progress messages and debug logging, and full tracebacks"

#: the loggers of nasprune's own packages: their messages are shown from the CLI's level up, another library's
#: only from ERROR up (ONNX Runtime's optimizer logs every fusion, some of it through the root logger)
OWN_LOGGERS = ("nasprune", "toolchain", "latency_models", "targets")


def _own_or_error(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_LOGGERS or record.levelno >= logging.ERROR


def setup_logging(verbose: bool) -> None:
    """nasprune's warnings (and errors) on stderr, with ``-v`` its progress messages and debug lines too; another
    library's messages only from ERROR up. The level is set on nasprune's own loggers, not on the root logger, whose
    level every logger without its own inherits (setting the root to ERROR once hid every warning of nasprune's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_own_or_error)
    logging.basicConfig(handlers=[handler])  # does nothing where the root logger has handlers (an embedding app)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("fusion_attention", "onnx_model", "fusion_base", "onnxruntime.transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
