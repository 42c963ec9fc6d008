"""One exception family for flgraph: every error says what was wrong and what to do about it.

Example:
    >>> import flgraph as fg
    >>> try:
    ...     raise fg.errors.PipelineError("two Select stages", fix="keep one Select")
    ... except fg.FlgraphError as e:
    ...     print(e)
    two Select stages
      fix: keep one Select
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "ClientError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "FlgraphError",
    "HistoryError",
    "PipelineError",
    "StopRun",
]


class FlgraphError(Exception):
    """Base of every error flgraph raises on purpose.

    ``message`` says what was wrong; ``fix`` (optional) says what to do about it.
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self._text())

    def _text(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions travel from Dask workers to the driver by pickle; keep the keyword.
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[FlgraphError], state: dict[str, Any]) -> FlgraphError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    Exception.__init__(err, err._text())
    return err


class PipelineError(FlgraphError):
    """A pipeline that cannot run (checked before anything runs)."""


class ConfigError(FlgraphError):
    """A setting with a value that cannot work."""


class DataError(FlgraphError):
    """A federated dataset that is malformed, or a client id it does not hold."""


class ClusterError(FlgraphError):
    """The Dask cluster could not be reached or lost what the run needed."""


class CheckpointError(FlgraphError):
    """A run directory that cannot be written or read; the previous snapshot stays valid."""


class HistoryError(FlgraphError, LookupError):
    """A metrics row the run's history no longer holds (older than its in-memory window, no run directory)."""


class ClientError(FlgraphError):
    """One client's work failed; names the client, the stage and the round."""

    def __init__(
        self,
        message: str,
        *,
        client: int,
        stage: str,
        round: int,
        fix: str | None = None,
    ) -> None:
        self.client = client
        self.stage = stage
        self.round = round
        super().__init__(f"round {round}, client {client}, stage {stage}: {message}", fix=fix)


class StopRun(Exception):
    """Raised by a server stage at the start of a round to end the run cleanly before that round.

    The round does not run and changes nothing; :meth:`flgraph.Run.fit` returns the history, with a
    checkpoint of the last completed round committed, and ``run.stopped`` holds the reason (e.g. a privacy
    budget that the next round would exceed).

    Example:
        >>> str(StopRun("privacy budget spent"))
        'privacy budget spent'
    """
