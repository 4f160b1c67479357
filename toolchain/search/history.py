"""``search_history.csv``: one row per evaluated candidate, written as it happens, read back to resume a search.

Columns (:data:`HISTORY_COLUMNS`): ``index`` (0, 1, ... in file order), ``key`` (``subnet.key()``), ``subnet`` (its
JSON), the metric values (empty where not measured), ``feasible`` (0/1), ``violation``, ``extra`` (JSON object of
the other values ``evaluate`` returned), ``eval_seconds``, ``time`` (Unix time of the evaluation).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Mapping

from toolchain.core.search_space import SearchSpace
from toolchain.core.subnetwork import SubNetwork
from toolchain.search.objectives import METRICS, HistoryError

log = logging.getLogger(__name__)

HISTORY_FILE = "search_history.csv"
HISTORY_COLUMNS = (
    "index", "key", "subnet", "error", "latency", "memory", "params",
    "feasible", "violation", "extra", "eval_seconds", "time",
)


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class SearchHistory:
    """``search_history.csv``: one row per evaluated candidate, written (and flushed) as it happens.

    Opening an existing file loads its rows (:attr:`rows`, key -> record) so a resumed search reuses them; a file
    that is not a search history (bad header, malformed rows, sub-networks of another space) raises
    :class:`HistoryError` naming the file. A last line cut off by a kill (no trailing newline) is dropped.
    """

    def __init__(self, path: Path | str, space: SearchSpace | None = None):
        path = Path(path)
        if path.is_dir() or path.suffix.lower() != ".csv":  # a run folder
            path = path / HISTORY_FILE
        self.path = path
        self.rows: dict[str, dict] = {}
        self.n_rows = 0
        self._load(space)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self.n_rows == 0 and self.path.stat().st_size == 0:
            self._writer.writerow(HISTORY_COLUMNS)
            self._file.flush()

    def _error(self, line: int | None, what: str) -> HistoryError:
        where = f"{self.path}" + (f", line {line}" if line is not None else "")
        return HistoryError(
            f"{where}: {what}. The file is not a resumable nasprune search history; "
            "delete it or choose another run folder."
        )

    def _load(self, space: SearchSpace | None) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(None, "not UTF-8 text") from None
        if not text.endswith("\n"):
            cut = text.rfind("\n")
            if cut < 0:
                raise self._error(1, "incomplete header")
            log.warning("%s: dropping an incomplete last line (the search was killed while writing it)", self.path)
            text = text[: cut + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(text.encode("utf-8")))
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            raise self._error(1, "no header") from None
        if tuple(header) != HISTORY_COLUMNS:
            raise self._error(1, f"unexpected header {','.join(header)!r} (expected {','.join(HISTORY_COLUMNS)!r})")
        try:
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                record = self._parse_row(row, line, space)
                self.rows.setdefault(record["key"], record)
                self.n_rows += 1
        except csv.Error as e:
            raise self._error(reader.line_num, f"malformed CSV ({e})") from None

    def _parse_row(self, row: list[str], line: int, space: SearchSpace | None) -> dict:
        if len(row) != len(HISTORY_COLUMNS):
            raise self._error(line, f"{len(row)} fields, expected {len(HISTORY_COLUMNS)}")
        d = dict(zip(HISTORY_COLUMNS, row))
        try:
            index = int(d["index"])
            if index != self.n_rows:
                raise ValueError(f"index {index} out of sequence (expected {self.n_rows})")
            subnet = SubNetwork.from_json(d["subnet"])
            if subnet.key() != d["key"]:
                raise ValueError(f"key {d['key']!r} does not match the sub-network")
            if space is not None:
                space.encode(subnet)  # raises if not a member of this space
                s = space.dims
                subnet.validate_for(s.num_layers, s.num_heads, s.intermediate_size)
            record: dict = {"index": index, "key": d["key"], "subnet": subnet}
            for m in METRICS:
                if d[m] != "":
                    value = float(d[m])
                    if not math.isfinite(value):
                        raise ValueError(f"{m} is {d[m]}")
                    record[m] = value
            if d["feasible"] not in ("0", "1"):
                raise ValueError(f"feasible must be 0 or 1, got {d['feasible']!r}")
            record["extra"] = json.loads(d["extra"]) if d["extra"] else {}
            if not isinstance(record["extra"], dict):
                raise ValueError("extra is not a JSON object")
            record["eval_seconds"] = float(d["eval_seconds"]) if d["eval_seconds"] else 0.0
            record["time"] = float(d["time"]) if d["time"] else 0.0
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise self._error(line, str(e)) from None
        return record

    def append(self, record: Mapping) -> None:
        extra = record.get("extra") or {}
        self._writer.writerow([
            record["index"], record["key"], record["subnet"].to_json(),
            *(_fmt(record.get(m)) for m in METRICS),
            int(bool(record["feasible"])), _fmt(record["violation"]),
            json.dumps(extra, separators=(",", ":"), sort_keys=True) if extra else "",
            _fmt(record["eval_seconds"]), _fmt(record["time"]),
        ])
        self._file.flush()
        self.n_rows += 1
        self.rows.setdefault(record["key"], dict(record))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
