"""Plots of a run's history with matplotlib (an optional extra: ``pip install matplotlib``).

:func:`plot_history` draws the usual curves, one panel each: loss (and test loss), accuracy, bytes moved
per round, and time per stage, against rounds (or ``x="sim_time"`` when rows carry simulated time).
Panels without data are left out. ``History.plot()`` calls it.

Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from flgraph.observe.history import History
    >>> h = History([{"round": 1, "loss": 2.0, "bytes_up": 100, "time_select": 0.01},
    ...              {"round": 2, "loss": 1.5, "accuracy": 0.6, "bytes_up": 90, "time_select": 0.02}])
    >>> fig = h.plot()
    >>> [ax.get_title() for ax in fig.axes]
    ['Loss', 'Accuracy', 'Bytes per round', 'Time per stage (s)']
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

__all__ = ["PANELS", "plot_history"]

PANELS: dict[str, tuple[str, ...]] = {
    "Loss": ("loss", "test_loss"),
    "Accuracy": ("accuracy",),
    "Bytes per round": ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_broadcast"),
    "Time per stage (s)": ("time_*", "round_time"),
}


def _numbers(rows: list[dict[str, Any]], x: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        a, b = r.get(x), r.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(b, bool) \
                and math.isfinite(float(b)):
            xs.append(float(a))
            ys.append(float(b))
    return xs, ys


def plot_history(history: Any, *, x: str = "round", panels: dict[str, tuple[str, ...]] | None = None,
                 figsize: tuple[float, float] | None = None) -> Any:
    """A matplotlib Figure with one panel per entry of ``panels`` (default :data:`PANELS`) that has data.

    ``history``: a :class:`~flgraph.observe.history.History` (or a list of row dicts); ``x``: the row key on the
    horizontal axis (``"round"``, or ``"sim_time"``); a panel's keys may end in ``*`` (a prefix).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("History.plot needs matplotlib",
                          fix="pip install matplotlib (or flgraph[plot])") from None
    rows = list(getattr(history, "rows", history))
    keys_seen: dict[str, None] = {}
    for r in rows:
        keys_seen.update(dict.fromkeys(r))
    if x not in keys_seen:
        raise ConfigError(f"no round reports {x!r}", fix="plot against x='round', or run with a device simulation "
                                                         "for x='sim_time'")
    chosen: list[tuple[str, list[str]]] = []
    for title, wanted in (panels or PANELS).items():
        keys = [k for w in wanted for k in keys_seen if (k.startswith(w[:-1]) if w.endswith("*") else k == w)]
        keys = [k for k in dict.fromkeys(keys) if _numbers(rows, x, k)[0]]
        if keys:
            chosen.append((title, keys))
    if not chosen:
        raise ConfigError("nothing to plot: no round reports a metric of the panels",
                          fix=f"metrics reported: {list(keys_seen)}; pass panels={{'title': ('key',)}}")
    ncols = 2 if len(chosen) > 1 else 1
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (6.0 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, chosen):
        for k in keys:
            xs, ys = _numbers(rows, x, k)
            ax.plot(xs, ys, marker="o", markersize=3, label=k, linestyle="--" if k in ("test_loss", "round_time",
                                                                                    "bytes_up_raw") else "-")
        ax.set_title(title)
        ax.set_xlabel("simulated time (s)" if x == "sim_time" else x)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.remove()
    fig.tight_layout()
    return fig
