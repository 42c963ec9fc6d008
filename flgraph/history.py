"""Per-round metrics of a run: one row (a dict) per round, plus a pandas-free table.

Example:
    >>> from flgraph.history import History
    >>> h = History()
    >>> h.append({"round": 1, "loss": 2.0}); h.append({"round": 2, "loss": 1.5, "accuracy": 0.6})
    >>> h.last("loss"), h.last("accuracy"), h.column("loss")
    (1.5, 0.6, [2.0, 1.5])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["History"]


class History:
    """Rows of per-round metrics, in round order."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows: list[dict[str, Any]] = list(rows or [])

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def keys(self) -> list[str]:
        """Every metric name that appears in some round, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def column(self, key: str) -> list[Any]:
        """The values of ``key`` for the rounds that report it."""
        return [r[key] for r in self.rows if key in r]

    def last(self, key: str) -> Any:
        """The most recent value of ``key``; a KeyError that lists the known metrics if none exists."""
        for r in reversed(self.rows):
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
        for r in self.rows:
            if metric in r and r[metric] >= target:
                if clock not in r:
                    raise KeyError(f"round {r.get('round')} reports no {clock!r}; metrics reported: {self.keys()}")
                return r[clock]
        return None

    def table(self, keys: list[str] | None = None) -> str:
        """A text table of the chosen metrics (default: round, loss, accuracy, clients, time)."""
        keys = keys or [k for k in ("round", "loss", "accuracy", "test_loss", "clients_done",
                                    "clients_failed", "round_time") if k in self.keys()]
        cells = [[_fmt(r.get(k, "")) for k in keys] for r in self.rows]
        widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def plot(self, *, x: str = "round", **kwargs: Any) -> Any:
        """The usual curves as a matplotlib Figure: loss, accuracy, bytes per round, time per stage.

        Needs matplotlib (an optional extra); ``x="sim_time"`` plots against simulated time. See
        :func:`flgraph.plotting.plot_history` for the options.
        """
        from .plotting import plot_history

        return plot_history(self, x=x, **kwargs)

    def __repr__(self) -> str:
        return f"History({len(self.rows)} rounds)\n{self.table()}" if self.rows else "History(0 rounds)"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
