"""The run directory's metrics table: every round's row, appended as the snapshots commit, read back on demand.

Numeric values go to ``metrics/table`` (float64, one column a metric, names in its attributes, NaN where
a round has no value); the other values of a row (lists of clients, strings) go to ``metrics/other`` as
JSON bytes with each row's end offset in ``metrics/other_end``. Counts (``clients_*``, ``bytes_*``,
``samples``) and the round read back as ints.

Example:
    >>> import zarr
    >>> from flgraph.store.checkpoint import RunDirectory, Snapshot
    >>> import numpy as np
    >>> rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={"seed": 0}, blobs={})
    >>> rows = [{"round": 1, "loss": 0.5, "failed_clients": [3]}, {"round": 2, "loss": 0.25}]
    >>> rd.write(Snapshot(round=2, target_round=2, params=np.ones(1, np.float32), states={}, rows=rows))
    >>> rd.read_rows(0, 2)
    [{'round': 1, 'loss': 0.5, 'failed_clients': [3]}, {'round': 2, 'loss': 0.25}]
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["INT_METRICS", "MetricsTable", "is_number", "json_default"]

INT_METRICS = ("clients", "bytes", "samples")  # counts: read back as ints


def is_number(v: Any) -> bool:
    """A value that goes to the numeric table (bools do not)."""
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def json_default(v: Any) -> Any:
    """numpy scalars and arrays as JSON."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"cannot store {type(v).__name__} in a snapshot's attributes")


class MetricsTable:
    """The metrics-table part of a :class:`~flgraph.store.checkpoint.RunDirectory` (``self.group``, the
    run's zarr group; ``self._table``, the opened table)."""

    group: Any
    format_version: int  # the run directory's format, recorded when the table moves a format-1 directory on
    _table: Any
    _legacy_other: dict[str, dict[str, Any]]

    def _append_metrics(self, rows: list[dict[str, Any]], start: int, n: int) -> None:
        """Write ``rows`` as rows ``start .. n - 1`` of the metrics tables (numeric metrics one column each,
        NaN where a round did not report one; the other values as JSON), which then hold ``n`` rows."""
        table = self._table
        if table is None:
            metrics = self.group["metrics"]
            if "table" not in metrics:
                metrics.create_array("table", shape=(0, 0), dtype="float64", chunks=(512, 32),
                                     fill_value=math.nan, attributes={"columns": []})
            table = self._table = metrics["table"]
        columns: list[str] = list(table.attrs.get("columns", []))
        new = sorted({k for r in rows for k, v in r.items() if is_number(v)} - set(columns))
        if new:
            columns += new
            table.attrs.update({"columns": columns})
        if table.shape != (n, len(columns)):
            table.resize((n, len(columns)))
        if start < n:
            block = np.full((n - start, len(columns)), math.nan)
            for i, r in enumerate(rows):
                for j, k in enumerate(columns):
                    v: Any = r.get(k)
                    if is_number(v):
                        block[i, j] = float(v)
            table[start:n, :] = block
        self._append_other(rows, start, n)

    def _other_arrays(self, start: int) -> tuple[Any, Any]:
        """The arrays of other values; created (in a format 1 directory: filled with the rows before
        ``start`` from the snapshot read) at the first write."""
        metrics = self.group["metrics"]
        if "other_end" in metrics:
            return metrics["other"], metrics["other_end"]
        other = metrics.create_array("other", shape=(0,), dtype="uint8", chunks=(2**20,), fill_value=0)
        ends = metrics.create_array("other_end", shape=(0,), dtype="int64", chunks=(2**16,), fill_value=0)
        if start:
            rounds = np.asarray(self._table[:start, list(self._table.attrs["columns"]).index("round")])
            earlier = [self._legacy_other.get(str(int(r)), {}) for r in rounds]
            self._write_other(other, ends, earlier, 0, start)
        self.group.attrs.update({"format_version": self.format_version})
        return other, ends

    def _append_other(self, rows: list[dict[str, Any]], start: int, n: int) -> None:
        other, ends = self._other_arrays(start)
        values = [{k: v for k, v in r.items() if not is_number(v) and k != "round"} for r in rows]
        self._write_other(other, ends, values, start, n)

    @staticmethod
    def _write_other(other: Any, ends: Any, values: list[dict[str, Any]], start: int, n: int) -> None:
        base = int(ends[start - 1]) if start else 0
        blobs = [json.dumps(v, sort_keys=True, default=json_default).encode() if v else b"" for v in values]
        end = base + np.cumsum([len(b) for b in blobs], dtype=np.int64)
        top = int(end[-1]) if len(end) else base
        ends.resize((n,))
        if start < n:
            ends[start:n] = end
        other.resize((top,))
        if top > base:
            other[base:top] = np.frombuffer(b"".join(blobs), np.uint8)

    # -- reading ---------------------------------------------------------------------------------------

    def _read_rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        metrics = self.group["metrics"]
        if "table" not in metrics or stop <= start:
            return []
        table = metrics["table"]
        columns: list[str] = list(table.attrs.get("columns", []))
        values = np.asarray(table[start:stop, :])
        other = self._read_other(metrics, start, stop)
        rows: list[dict[str, Any]] = []
        for i in range(stop - start):
            row: dict[str, Any] = {}
            for j, k in enumerate(columns):
                v = float(values[i, j])
                if not math.isnan(v):
                    row[k] = int(v) if v.is_integer() and (k == "round" or k.startswith(INT_METRICS)) else v
            if other is not None:
                row.update(other[i])
            elif "round" in row:
                row.update(self._legacy_other.get(str(row["round"]), {}))
            rows.append(dict(sorted(row.items(), key=lambda kv: kv[0] != "round")))
        return rows

    @staticmethod
    def _read_other(metrics: Any, start: int, stop: int) -> list[dict[str, Any]] | None:
        """The other values of rows ``start .. stop - 1``; None in a format 1 directory (or rows it lacks)."""
        if "other_end" not in metrics or metrics["other_end"].shape[0] < stop:
            return None
        ends = np.asarray(metrics["other_end"][max(0, start - 1):stop])
        base = int(ends[0]) if start else 0
        ends = ends[1:] if start else ends
        top = int(ends[-1])
        data = bytes(np.asarray(metrics["other"][base:top]).tobytes()) if top > base else b""
        out, at = [], base
        for e in ends.tolist():
            out.append(json.loads(data[at - base:e - base]) if e > at else {})
            at = e
        return out
