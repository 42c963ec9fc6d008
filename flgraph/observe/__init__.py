"""What a run shows while it runs: the history of round metrics, the metrics file, the progress bar,
the FL page of the Dask dashboard, and plots.

* :mod:`flgraph.observe.history` — the rows of a run, a bounded window in memory, the rest on disk;
* :mod:`flgraph.observe.metrics_log` — every round's row appended to a ``.jsonl`` or ``.csv`` file;
* :mod:`flgraph.observe.trackers` — the config and every round's numbers sent to TensorBoard, W&B, MLflow;
* :mod:`flgraph.observe.progress` — the terminal progress bar;
* :mod:`flgraph.observe.dashboard` (and ``dashboard_page``) — the ``/flgraph`` page next to Dask's;
* :mod:`flgraph.observe.plotting` — curves for notebooks.

Example:
    >>> from flgraph.observe import History
    >>> History([{"round": 1, "loss": 0.5}]).last("loss")
    0.5
"""

from .history import History

__all__ = ["History"]
