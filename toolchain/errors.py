"""What the commands tell the user when something goes wrong: an error that is the user's to act on (a bad value, a
missing file, a device this machine lacks) is one line ``error: ...``; anything else is a bug, reported as one,
with the traceback under ``-v``."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from latency_models.lookup_table import TableError
from targets import ProviderUnavailableError, TargetError
from toolchain.core.data import DataError
from toolchain.core.modeling import ModelLoadError
from toolchain.options import CompileError
from toolchain.recover import RecoverError
from toolchain.run import RunError
from toolchain.search.executors import ExecutorError
from toolchain.search.objectives import SearchError
from toolchain.ship.measured import MeasuredError
from toolchain.ship.verify import VerificationError
from toolchain.training import CheckpointError, TrainingError
from toolchain.units import BudgetError


class UsageError(ValueError):
    """Command-line values that do not fit together."""


#: the errors that are the user's to act on (input, files, the machine); every error class of ours is one of them
USER_ERRORS = (CompileError, RunError, SearchError, DataError, ModelLoadError, TableError, TargetError,
               ProviderUnavailableError, VerificationError, ExecutorError, CheckpointError, TrainingError, BudgetError,
               MeasuredError, RecoverError, UsageError, OSError)


def report_error(error: BaseException, verbose: bool) -> int:
    """Print ``error`` for the user (stderr) and return the exit status: 2 for a user error, 1 for a bug."""
    if verbose:
        traceback.print_exception(error)
    if isinstance(error, USER_ERRORS):
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"error: internal error ({type(error).__name__}: {error}). This is a bug in nasprune: please report it, "
          "with " + ("the traceback above" if verbose else "the output of the same command with -v (it shows the "
                     "traceback)"), file=sys.stderr)
    return 1


NOTHING_SHIPPED = 3  # the exit status of a compile or `nasprune export` that ships no point


def nothing_shipped(folder: Path, manifest: dict) -> int:
    """A compile or export that shipped nothing: why, for the closest points, and a non-zero exit."""
    closest = [f"\n  {p['id']}: {p['infeasible_reason']}" for p in manifest["points"] if p.get("infeasible_reason")]
    print(f"error: no exported point meets the budget ({len(closest)} tried; kept in {folder / 'rejected'}):"
          + "".join(closest[:3]) + f"\nrelax the budget, or try more candidates: nasprune export {folder} --export N",
          file=sys.stderr)
    return NOTHING_SHIPPED
