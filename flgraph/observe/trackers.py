"""Experiment trackers: a run's config and every round's metrics sent to TensorBoard, Weights & Biases or
MLflow, through one callback interface.

A :class:`Tracker` is a run callback (``Run(callbacks=[...])``). When the run starts it sends the run's
config once (:func:`run_config`: the seed, the pipeline as ``Select >> ... >> Aggregate``, each stage's
settings, the model and data summaries); after each round it sends the row's numbers at step ``round``;
when the run is closed (``Run.close()`` or the end of a ``with`` block) it ends the tracker's run. A
tracker only implements :meth:`Tracker.log_config`, :meth:`Tracker.log_metrics` and
:meth:`Tracker.finish`. The packages are optional extras (``flgraph[tensorboard]``, ``flgraph[wandb]``,
``flgraph[mlflow]``); a tracker whose package is missing refuses to be made, naming the extra.

The config never carries secrets: a setting whose name says key, secret, token or password is sent as
``"<redacted>"``. Seeds are sent: a run's randomness is public by design, and flgraph derives no secret from
any seed (DP noise keys and secure-aggregation keys come from the operating system and live in the run's
state, never in a stage's settings).

Example:
    >>> from flgraph.observe.trackers import Tracker
    >>> class Printer(Tracker):
    ...     def log_config(self, config): print(sorted(config))
    ...     def log_metrics(self, metrics, step): print(step, metrics)
    >>> class FakeRun:
    ...     seed, pipeline = 3, []
    >>> p = Printer()
    >>> p.on_start(FakeRun())
    ['pipeline', 'seed']
    >>> p.on_round(FakeRun(), {"round": 1, "loss": 0.5, "clients": 4, "note": "text"})
    1 {'loss': 0.5, 'clients': 4.0}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "WandbTracker", "run_config"]

_SECRET_WORDS = ("key", "secret", "token", "password")
REDACTED = "<redacted>"


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in _SECRET_WORDS) else _redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _flat_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def run_config(run: Any) -> dict[str, Any]:
    """The run's config as a flat dict of plain values (numbers, text), secrets redacted.

    Keys: ``seed``, ``pipeline`` (stage names joined by ``>>``), ``stage<i>.<Name>.<setting>`` for each
    stage's settings (nested ones as JSON text), ``model`` and ``data`` (one-line summaries) and
    ``clients`` when the run has them.

    Example:
        >>> from flgraph import stages as st
        >>> class FakeRun:
        ...     seed, pipeline = 7, st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain(lr=0.1) >> st.Aggregate()
        >>> cfg = run_config(FakeRun())
        >>> cfg["seed"], cfg["pipeline"], cfg["stage3.LocalTrain.lr"]
        (7, 'Select >> Broadcast >> LocalTrain >> Aggregate', 0.1)
    """
    from ..spec import _value  # settings as JSON values, the form checkpoints record them in

    config: dict[str, Any] = {"seed": int(getattr(run, "seed", 0))}
    stages = list(run.pipeline)
    config["pipeline"] = " >> ".join(type(s).__name__ for s in stages)
    for i, stage in enumerate(stages, start=1):
        settings = stage.settings() if hasattr(stage, "settings") else {}
        for k, v in _redact({k: _value(v) for k, v in settings.items()}).items():
            config[f"stage{i}.{type(stage).__name__}.{k}"] = _flat_value(v)
    adapter = getattr(run, "adapter", None)
    if adapter is not None:
        config["model"] = run.state.params.spec.describe()
    data = getattr(run, "data", None)
    if data is not None:
        config["data"] = repr(data)
        config["clients"] = int(data.num_clients)
    return config


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool):
            continue
        if isinstance(v, int | float) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            f = float(v)
            if math.isfinite(f):
                out[k] = f
    return out


class Tracker:
    """The callback every tracker shares; subclasses send what it hands them.

    ``log_config(config)`` once per run (before the first round), ``log_metrics(metrics, step)`` after
    each round (finite numbers only; ``step`` is the round), ``flush()`` at the end of each ``fit`` and
    ``finish()`` when the run is closed.
    """

    _config_sent = False

    def log_config(self, config: dict[str, Any]) -> None:
        """Send the run's config (see :func:`run_config`)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Send one round's numbers."""

    def flush(self) -> None:
        """Make what was sent durable (end of a ``fit``)."""

    def finish(self) -> None:
        """End the tracker's run (the flgraph run was closed)."""

    # -- the run callback ------------------------------------------------------------------------------
    def on_start(self, run: Any) -> None:
        if not self._config_sent:
            self._config_sent = True
            self.log_config(run_config(run))

    def on_round(self, run: Any, row: dict[str, Any]) -> None:
        self.log_metrics(_numbers(row), int(row.get("round", 0)))

    def on_end(self, run: Any) -> None:
        self.flush()

    def on_close(self, run: Any) -> None:
        self.finish()


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(f"this tracker needs the {package} package", fix=f"pip install 'flgraph[{extra}]'")


class TensorBoardTracker(Tracker):
    """Scalars ``flgraph/<metric>`` at step ``round`` and the config as the text ``flgraph/config`` (a
    two-column table), in TensorBoard event files under ``logdir``.

    >>> fg.Run(pipeline, model=model, data=data, callbacks=[TensorBoardTracker("runs/tb")])  # doctest: +SKIP
    """

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = str(Path(logdir).expanduser())
        self.writer = _summary_writer(self.logdir)

    def log_config(self, config: dict[str, Any]) -> None:
        table = "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in config.items())
        self.writer.add_text("flgraph/config", table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"flgraph/{k}", v, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()

    def close(self) -> None:
        """Close the event file (what :meth:`finish` does when the run is closed)."""
        self.writer.close()


def _summary_writer(logdir: str) -> Any:
    import importlib

    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            writer = importlib.import_module(module).SummaryWriter
        except ImportError:
            continue
        return writer(log_dir=logdir)
    raise ConfigError("TensorBoard logging needs the tensorboard package",
                      fix="pip install tensorboard (or 'flgraph[tensorboard]', or tensorboardX), or use MetricsLog")


class WandbTracker(Tracker):
    """A Weights & Biases run: the config as ``wandb.config``, the metrics with ``step=round``.

    The keyword arguments go to ``wandb.init`` (``project``, ``name``, ``dir``, ``mode="offline"``...);
    ``wandb.init`` is called when the flgraph run starts. Offline runs (``mode="offline"`` or
    ``WANDB_MODE=offline``) are written under ``dir`` and uploaded later with ``wandb sync``.

    >>> tracker = WandbTracker(project="fl", mode="offline")  # doctest: +SKIP
    >>> fg.Run(pipeline, model=model, data=data, callbacks=[tracker])  # doctest: +SKIP
    """

    def __init__(self, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self._wandb = wandb
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def log_config(self, config: dict[str, Any]) -> None:
        self.run = self._wandb.init(config=config, **self.init_kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflowTracker(Tracker):
    """An MLflow run in ``experiment``: the config as params, the metrics at ``step=round``.

    ``tracking_uri`` is where MLflow keeps runs, e.g. ``"file:/path/mlruns"`` (a local file store; MLflow 3
    opens one only with ``MLFLOW_ALLOW_FILE_STORE=true`` set), ``"sqlite:///mlflow.db"`` or a tracking
    server's URL; default: MLflow's own (``MLFLOW_TRACKING_URI``). A store MLflow refuses is a
    :class:`~flgraph.errors.ConfigError` when the tracker is made, before the run starts. The run is made through
    ``MlflowClient`` (no global active run, so several flgraph runs in one process do not mix); its id is
    :attr:`run_id` once the flgraph run has started.

    >>> fg.Run(pipeline, model=model, data=data, callbacks=[MLflowTracker("file:./mlruns")])  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str | None = None, *, experiment: str = "flgraph",
                 run_name: str | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
        except Exception as e:  # MlflowException: the store cannot be opened
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"MLflow cannot open the tracking store {tracking_uri!r}: {why}",
                              fix="for a local file store (kept in maintenance mode since MLflow 3) set "
                                  "MLFLOW_ALLOW_FILE_STORE=true; or use a database, e.g. "
                                  "'sqlite:///mlflow.db' (needs the full mlflow package)") from None
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
        params = [Param(k, "" if v is None else str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
