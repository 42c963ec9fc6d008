"""A progress bar over rounds (tqdm): round, loss, accuracy, client updates per second.

Example:
    >>> from flgraph.observe.progress import RoundProgress
    >>> with RoundProgress(total=2, enabled=False) as bar:
    ...     bar.update({"round": 1, "loss": 1.0, "clients_done": 10, "round_time": 0.5})
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

try:  # the notebook widget when it can be drawn, plain text otherwise (no "IProgress not found" warning)
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

__all__ = ["RoundProgress"]


class RoundProgress:
    """Shows one line that advances once per round."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "flgraph") -> None:
        self.bar = tqdm(total=total, desc=desc, unit="round", disable=not enabled, dynamic_ncols=True)
        self.accuracy: float | None = None

    def update(self, row: dict[str, Any]) -> None:
        if "accuracy" in row:
            self.accuracy = row["accuracy"]
        post = {"round": row.get("round")}
        if "loss" in row:
            post["loss"] = f"{row['loss']:.4f}"
        if self.accuracy is not None:
            post["acc"] = f"{self.accuracy:.4f}"
        if row.get("round_time"):
            post["upd/s"] = f"{row.get('clients_done', 0) / row['round_time']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def __enter__(self) -> RoundProgress:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.close()
