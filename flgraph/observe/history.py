"""Per-round metrics of a run: one row (a dict) per round, plus a pandas-free table.

A run of many thousand rounds must not grow the driver's memory without bound, so a History keeps the
newest ``window`` rows in memory (:attr:`History.default_window`, 10,000: a research run of a few thousand
rounds stays whole in memory). A run with a run directory (``Run(checkpoint=...)``) writes every row to
its metrics table, and the History reads older rows back from there: indexing, iteration, :meth:`column`,
:meth:`last`, :meth:`table` and :attr:`rows` cover the whole run. Without a run directory, rows older than
the window are dropped: the methods that scan rows cover the window, and asking for a dropped row by index
raises a :class:`~flgraph.errors.HistoryError` that says how to keep it. ``len(history)`` is always the
number of rounds recorded.

Example:
    >>> from flgraph.observe.history import History
    >>> h = History()
    >>> h.append({"round": 1, "loss": 2.0}); h.append({"round": 2, "loss": 1.5, "accuracy": 0.6})
    >>> h.last("loss"), h.last("accuracy"), h.column("loss")
    (1.5, 0.6, [2.0, 1.5])
    >>> small = History(window=2)
    >>> for r in range(1, 6):
    ...     small.append({"round": r})
    >>> len(small), small.first_kept, small.column("round")
    (5, 3, [4, 5])
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, overload

from ..errors import ConfigError, HistoryError

__all__ = ["History", "RowStore"]

log = logging.getLogger("flgraph")

_READ_BLOCK = 4096  # rows read back from the run directory at a time


class RowStore(Protocol):
    """Where a History reads back rows older than its window (a :class:`~flgraph.store.checkpoint.RunDirectory`)."""

    @property
    def rows_written(self) -> int:
        """Rows ``0 .. rows_written - 1`` are saved (committed) and can be read back."""
        ...

    def read_rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows ``start .. stop - 1`` of the run (``stop <= rows_written``)."""
        ...


class History:
    """Rows of per-round metrics, in round order; the newest ``window`` rows in memory.

    ``rows``: the first rows (a resumed run passes the newest rows of its snapshot with ``first``, their
    index in the run, and its run directory as ``store``). ``window``: rows kept in memory (default
    :attr:`default_window`); a row is dropped from memory only once ``store`` has saved it, so rows not yet
    saved (between snapshots) stay. Raise the window for a run without a run directory with
    ``run.history.window = N`` before ``fit``, or for every run with ``flgraph.History.default_window = N``.
    """

    default_window: ClassVar[int] = 10_000

    def __init__(self, rows: list[dict[str, Any]] | None = None, *, window: int | None = None,
                 store: RowStore | None = None, first: int = 0) -> None:
        self.window = int(window if window is not None else History.default_window)
        if self.window < 1:
            raise ConfigError(f"History(window={self.window}): keep at least one row in memory")
        self._recent: list[dict[str, Any]] = list(rows or [])
        self._first = int(first)  # index in the run of self._recent[0]
        self.store = store
        self._warned = False
        self._trim()

    # -- recording -------------------------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> None:
        self._recent.append(dict(row))
        self._trim()

    def attach(self, store: RowStore) -> None:
        """Read rows older than the window back from ``store`` (the run directory rows are saved to)."""
        self.store = store

    def _trim(self) -> None:
        excess = len(self._recent) - self.window
        if excess <= 0:
            return
        if self.store is not None:  # only rows the store can give back leave memory
            excess = min(excess, self.store.rows_written - self._first)
            if excess <= 0:
                return
        elif not self._warned:
            self._warned = True
            log.warning("flgraph: the run's history keeps the newest %d rows in memory and has no run directory "
                        "to keep older ones; rounds before %d are dropped from it (give Run(checkpoint=...) to "
                        "keep every row, or raise flgraph.History.default_window)",
                        self.window, self._first + excess + 1)
        del self._recent[:excess]
        self._first += excess

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def first_kept(self) -> int:
        """Index of the oldest row that can be read: 0 with a run directory, else the window's first."""
        return 0 if self.store is not None else self._first

    @property
    def recent(self) -> list[dict[str, Any]]:
        """The rows held in memory (the newest; all of them for a run shorter than the window)."""
        return list(self._recent)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every readable row as a list (read back from the run directory where needed)."""
        return list(self)

    def __len__(self) -> int:
        return self._first + len(self._recent)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._range(self.first_kept, len(self))

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if start < stop and start < self.first_kept:
                self._missing(start)
            return list(self._range(start, stop))
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"history index {i} out of range ({n} rounds)")
        if j < self.first_kept:
            self._missing(j)
        return next(self._range(j, j + 1))

    def _missing(self, j: int) -> None:
        raise HistoryError(f"row {j} (round {j + 1}) fell out of the history's window: only the newest "
                           f"{self.window} rows are kept in memory (rows {self._first}..{len(self) - 1}), "
                           "and the run has no run directory to read older rows back from",
                           fix="give Run(checkpoint=...) so every row is saved and read back, or raise the window: "
                               "run.history.window = N before fit, or flgraph.History.default_window = N before "
                               "creating the Run")

    def _range(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows ``start .. stop - 1``: those older than memory from the store, in blocks."""
        first = self._first  # read once: the window may move while the caller iterates
        recent = self._recent[max(0, start - first):max(0, stop - first)]
        for a in range(start, min(stop, first), _READ_BLOCK):
            assert self.store is not None
            yield from self.store.read_rows(a, min(a + _READ_BLOCK, stop, first))
        yield from recent

    def _reversed(self) -> Iterator[dict[str, Any]]:
        yield from reversed(self._recent)
        for b in range(self._first, self.first_kept, -_READ_BLOCK):
            assert self.store is not None
            yield from reversed(self.store.read_rows(max(self.first_kept, b - _READ_BLOCK), b))

    def keys(self) -> list[str]:
        """Every metric name that appears in some round, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def column(self, key: str) -> list[Any]:
        """The values of ``key`` for the rounds that report it."""
        return [r[key] for r in self if key in r]

    def last(self, key: str) -> Any:
        """The most recent value of ``key``; a KeyError that lists the known metrics if none exists."""
        for r in self._reversed():
            if key in r:
                return r[key]
        raise KeyError(f"no round reported {key!r}; metrics reported: {self.keys()}"
                       + (" (add st.Evaluate() to the pipeline for accuracy)" if key == "accuracy" else ""))

    def time_to(self, target: float, *, metric: str = "accuracy", clock: str = "sim_time") -> float | None:
        """The ``clock`` value (simulated seconds by default; ``"round"`` for rounds) of the first round whose
        ``metric`` reaches ``target``, or None if none did.

        Example:
            >>> h = History([{"round": 1, "sim_time": 10.0, "accuracy": 0.4},
            ...              {"round": 2, "sim_time": 25.0, "accuracy": 0.7}])
            >>> h.time_to(0.6), h.time_to(0.6, clock="round"), h.time_to(0.9)
            (25.0, 2, None)
        """
        for r in self:
            if metric in r and r[metric] >= target:
                if clock not in r:
                    raise KeyError(f"round {r.get('round')} reports no {clock!r}; metrics reported: {self.keys()}")
                return r[clock]
        return None

    def table(self, keys: list[str] | None = None) -> str:
        """A text table of the chosen metrics (default: round, loss, accuracy, clients, time)."""
        rows = self.rows
        known: dict[str, None] = {}
        for r in rows:
            known.update(dict.fromkeys(r))
        keys = keys or [k for k in ("round", "loss", "accuracy", "test_loss", "clients_done",
                                    "clients_failed", "round_time") if k in known]
        cells = [[_fmt(r.get(k, "")) for k in keys] for r in rows]
        widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def plot(self, *, x: str = "round", **kwargs: Any) -> Any:
        """The usual curves as a matplotlib Figure: loss, accuracy, bytes per round, time per stage.

        Needs matplotlib (an optional extra); ``x="sim_time"`` plots against simulated time. See
        :func:`flgraph.observe.plotting.plot_history` for the options.
        """
        from .plotting import plot_history

        return plot_history(self, x=x, **kwargs)

    def __repr__(self) -> str:
        return f"History({len(self)} rounds)\n{self.table()}" if len(self) else "History(0 rounds)"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
