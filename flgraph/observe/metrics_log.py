"""Per-round metrics written as a run goes: a JSON-lines or CSV file, and TensorBoard scalars.

:class:`MetricsLog` is the callback behind ``Run(metrics_log=...)``. ``"auto"`` (the default) writes
``metrics.jsonl`` inside the run directory when the run checkpoints to a local path (beside the zarr
metrics table the snapshots carry), and nothing otherwise. The file always holds exactly the run's
history: it is (re)written from ``run.history`` when the run first starts, so a resumed run keeps the rows
up to its snapshot and drops the rows of rounds that are run again; then one line is appended (and flushed)
per completed round, so a crash loses at most the round in flight. The rows are not kept in memory (a run
may last many thousand rounds): a later ``fit`` goes on appending. A ``.csv`` path writes CSV instead (its
header grows when a new metric appears, e.g. accuracy at the first evaluation: the file is then read back
and rewritten). Writing errors are logged once and stop the file, never the run.

Read a file back with :func:`read_metrics` (a list of row dicts; ``History(read_metrics(path))``).

:class:`TensorBoardLog` (:class:`flgraph.observe.trackers.TensorBoardTracker`) writes every numeric metric
as a scalar ``flgraph/<name>`` at step ``round`` when ``tensorboard`` (or ``tensorboardX``) is installed;
:mod:`flgraph.observe.trackers` has Weights & Biases and MLflow too.

Example:
    >>> import tempfile, pathlib
    >>> from flgraph.observe.metrics_log import MetricsLog, read_metrics
    >>> class FakeRun:  # what the callback reads from a Run
    ...     history, checkpoint_directory = [], None
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> log = MetricsLog(path)
    >>> log.on_start(FakeRun())
    >>> log.on_round(FakeRun(), {"round": 1, "loss": 0.5, "time_select": 0.01})
    >>> log.on_end(FakeRun())
    >>> read_metrics(path)
    [{'round': 1, 'loss': 0.5, 'time_select': 0.01}]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError
from .trackers import TensorBoardTracker

__all__ = ["MetricsLog", "TensorBoardLog", "read_metrics"]

log = logging.getLogger("flgraph")

AUTO_NAME = "metrics.jsonl"


def _plain(v: Any) -> Any:
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item) and getattr(v, "ndim", 1) == 0:
        return _plain(item())
    tolist = getattr(v, "tolist", None)  # numpy arrays
    if callable(tolist):
        return _plain(tolist())
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _local_run_path(run: Any) -> Path | None:
    """The run directory's local path, or None (no checkpoint, or a store that is not a local folder)."""
    directory = getattr(run, "checkpoint_directory", None)
    store = getattr(getattr(directory, "group", None), "store", None)
    root = getattr(store, "root", None)
    if root is None or type(store).__name__ != "LocalStore":
        return None
    return Path(root)


class MetricsLog:
    """A run callback that writes each round's metrics row to ``path`` (``.csv``: CSV, else JSON lines).

    ``path="auto"``: ``metrics.jsonl`` inside the run directory when the run checkpoints to a local path,
    otherwise no file (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.auto = isinstance(path, str) and path == "auto"
        self.path: Path | None = None if self.auto else Path(path).expanduser()
        self._file: IO[str] | None = None
        self._columns: list[str] = []
        self._started = False  # the file holds the run's history; later fits append to it
        self._failed = False

    @property
    def csv(self) -> bool:
        return self.path is not None and self.path.suffix.lower() == ".csv"

    # -- callback --------------------------------------------------------------------------------------
    def on_start(self, run: Any) -> None:
        if self.auto:
            root = _local_run_path(run)
            self.path = root / AUTO_NAME if root is not None else None
        if self.path is None or self._started:
            return
        self._started = True
        self._guard(lambda: self._rewrite([{k: _plain(v) for k, v in r.items()} for r in getattr(run, "history", [])]))
        if self.path is not None and not self._failed:
            log.info("flgraph: metrics of every round go to %s", self.path)

    def on_round(self, run: Any, row: dict[str, Any]) -> None:
        if self.path is None or self._failed:
            return
        plain = {k: _plain(v) for k, v in row.items()}
        self._guard(lambda: self._append(plain))

    def on_end(self, run: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (the next round reopens it for appending)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                log.warning("flgraph: closing the metrics file %s failed: %s", self.path, e)
            self._file = None

    # -- writing ---------------------------------------------------------------------------------------
    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except (OSError, ValueError, TypeError) as e:
            self._failed = True
            self.close()
            log.warning("flgraph: writing the metrics file %s failed (%s); the run goes on without it",
                        self.path, e)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        assert self.path is not None
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if self.csv:
                self._columns = _columns(rows)
                if self._columns:
                    f.write(_csv_lines(self._columns, rows, header=True))
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)

    def _append(self, row: dict[str, Any]) -> None:
        assert self.path is not None
        if self.csv and (not self._columns or set(row) - set(self._columns)):
            self.close()
            earlier = read_metrics(self.path) if self._columns else []
            self._rewrite([*earlier, row])  # a new column: the header changes
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (kept open across rounds)
        self._file.write(_csv_lines(self._columns, [row], header=False) if self.csv else json.dumps(row) + "\n")
        self._file.flush()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _csv_lines(columns: list[str], rows: list[dict[str, Any]], *, header: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(k) is None else json.dumps(r[k]) if isinstance(r[k], list | dict) else r[k]
                    for k in columns])
    return buf.getvalue()


def _cell(text: str) -> Any:
    if text == "":
        return None
    try:
        return json.loads(text)  # numbers, lists, booleans (written as JSON)
    except ValueError:
        return {"True": True, "False": False}.get(text, text)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics file written by :class:`MetricsLog` (JSON lines or CSV), in round order.

    A run directory may be given for its ``metrics.jsonl``. A last line cut short by a crash is skipped.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / AUTO_NAME
    if not p.exists():
        raise ConfigError(f"no metrics file at {p}",
                          fix="pass the file given to Run(metrics_log=...), or a run directory written with "
                              "checkpoint= and the default metrics_log='auto'")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        return [{k: _cell(c) for k, c in zip(header, cells) if c != ""} for cells in reader
                if len(cells) == len(header)]
    rows = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


#: The TensorBoard writer, under the name it had before the trackers: see
#: :class:`flgraph.observe.trackers.TensorBoardTracker` (it also sends the run's config).
TensorBoardLog = TensorBoardTracker
