"""The FL page of the Dask dashboard: a run's rounds, stages, clients, curves, bytes and timings.

A :class:`Dashboard` callback (added by ``Run(dashboard=True)``, the default) registers a
:class:`DashboardPlugin` on the run's Dask scheduler once (idempotent), then sends each completed round's
metrics row to it as a scheduler event (topic ``"flgraph"``) without waiting for a reply. The plugin keeps
the rows of the last few runs in a :class:`RunBoard` and serves a Bokeh page, ``/flgraph`` next to
``/status``, from the scheduler's own web server, so it works on the embedded LocalCluster and on a
remote scheduler alike (flgraph and bokeh must be importable where the scheduler runs); ``/flgraph.json``
gives the latest run in brief. The page shows:

- the current round and stage (from the run's task keys that are processing, e.g. ``local-train``),
  clients selected, done, dropped and stale in the last round;
- loss and accuracy against rounds, and against simulated time when rows carry ``sim_time``;
- bytes up and down per round (``bytes_up``, ``bytes_up_raw``, ``bytes_down``, ``bytes_broadcast``);
- time per stage (the row's ``time_*`` keys and ``round_time``);
- the slowest clients of the last round when rows carry ``slowest_clients`` (``[[client, seconds], ...]``).

Dask's own pages (task stream, progress, groups) group the run's tasks by stage because task keys start
with the stage name. A dashboard that cannot be set up (no bokeh on the scheduler, a scheduler without a
dashboard, an old flgraph there) is logged once and the run goes on without it.

Example:
    >>> from flgraph.observe.dashboard import RunBoard, page_link
    >>> page_link("http://127.0.0.1:8787/status")
    'http://127.0.0.1:8787/flgraph'
    >>> board = RunBoard()
    >>> board.feed({"kind": "start", "token": "ab12cd34", "target_round": 2, "pipeline": "Select >> ..."})
    >>> board.feed({"kind": "round", "token": "ab12cd34", "target_round": 2,
    ...             "row": {"round": 1, "loss": 2.3, "clients_selected": 10, "clients_done": 9,
    ...                     "clients_failed": 1}})
    >>> rec = board.latest()
    >>> rec.last_round, rec.status, rec.clients()
    (1, 'running', {'selected': 10, 'done': 9, 'dropped': 1, 'stale': 0})
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["PAGE", "TOPIC", "Dashboard", "DashboardPlugin", "RunBoard", "RunRecord", "page_link", "wire_row"]

log = logging.getLogger("flgraph")

TOPIC = "flgraph"  # the scheduler event topic rows travel under
PAGE = "flgraph"  # the page's path on the dashboard, next to "status"
_MAX_LIST = 20  # longer lists in a row (failed client ids) are not sent to the page


def page_link(dashboard_link: str) -> str:
    """The FL page's address, given the Dask dashboard's (``client.dashboard_link``); empty if none."""
    if not dashboard_link:
        return ""
    base = dashboard_link.rstrip("/")
    if base.endswith("/status"):
        base = base[: -len("/status")]
    return f"{base}/{PAGE}"


def _plain(v: Any) -> Any:
    """``v`` as a msgpack/JSON-friendly value (numpy scalars to Python numbers), or None to leave it out."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return v[:200]
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item) and getattr(v, "ndim", 1) == 0:
        return _plain(item())
    if isinstance(v, list | tuple) and len(v) <= _MAX_LIST:
        out = [_plain(x) for x in v]
        return out if all(x is not None for x in out) else None
    if isinstance(v, dict) and len(v) <= _MAX_LIST:
        d = {str(k): _plain(x) for k, x in v.items()}
        return {k: x for k, x in d.items() if x is not None}
    return None


def wire_row(row: dict[str, Any]) -> dict[str, Any]:
    """The parts of a metrics row the page uses, as plain values (long lists are left out).

    >>> import numpy as np
    >>> wire_row({"round": np.int64(3), "loss": np.float32(0.5), "failed_clients": list(range(100))})
    {'round': 3, 'loss': 0.5}
    """
    out: dict[str, Any] = {}
    for k, v in row.items():
        p = _plain(v)
        if p is not None:
            out[str(k)] = p
    return out


@dataclass
class RunRecord:
    """One run as the page sees it: its rows and whether rounds are still coming."""

    token: str
    target_round: int = 0
    pipeline: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "starting"
    updated: float = field(default_factory=time.time)
    version: int = 0

    @property
    def last_round(self) -> int:
        return int(self.rows[-1].get("round", 0)) if self.rows else 0

    def clients(self) -> dict[str, int]:
        """Clients selected, done, dropped and stale in the last round (0 where the row has no count)."""
        r = self.rows[-1] if self.rows else {}
        done = int(r.get("clients_done", 0))
        dropped = int(r.get("clients_failed", 0)) + int(r.get("clients_dropped", 0))
        return {"selected": int(r.get("clients_selected", done + dropped)), "done": done,
                "dropped": dropped, "stale": int(r.get("clients_stale", 0))}

    def last(self, key: str) -> Any:
        """The newest value of ``key`` in the rows, or None."""
        for r in reversed(self.rows):
            if key in r:
                return r[key]
        return None

    def columns(self) -> list[str]:
        """Every numeric key of the rows, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update((k, None) for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool))
        return list(seen)


class RunBoard:
    """The runs the page knows, fed by the events of :class:`Dashboard` callbacks (newest last).

    ``feed`` takes ``{"kind": "start" | "round" | "end", "token": ..., ...}``; rows arrive at most once per
    round (a row for a round already held replaces it, so a retried or resumed round is not counted twice).
    """

    def __init__(self, keep_runs: int = 8) -> None:
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self.keep_runs = keep_runs

    def feed(self, msg: Any) -> None:
        if not isinstance(msg, dict) or not isinstance(msg.get("token"), str):
            return
        token = msg["token"]
        rec = self.runs.get(token)
        if rec is None:
            rec = self.runs[token] = RunRecord(token)
            while len(self.runs) > self.keep_runs:
                self.runs.popitem(last=False)
        self.runs.move_to_end(token)
        kind = msg.get("kind")
        if isinstance(msg.get("target_round"), int):
            rec.target_round = msg["target_round"]
        if kind == "start":
            rec.pipeline = str(msg.get("pipeline", ""))
            rec.status = "running"
            rows = msg.get("rows")
            if isinstance(rows, list):
                rec.rows = [r for r in rows if isinstance(r, dict)]
        elif kind == "round" and isinstance(msg.get("row"), dict):
            row = msg["row"]
            rnd = row.get("round")
            rec.rows = [r for r in rec.rows if r.get("round") != rnd]
            rec.rows.append(row)
            rec.rows.sort(key=lambda r: r.get("round", 0))
            rec.status = "running" if rec.last_round < rec.target_round else "done"
        elif kind == "end":
            rec.status = "done" if rec.last_round >= rec.target_round else "stopped"
        rec.updated = time.time()
        rec.version += 1

    def latest(self) -> RunRecord | None:
        """The run that reported last, or None."""
        return next(reversed(self.runs.values())) if self.runs else None

    def summary(self) -> dict[str, Any]:
        """The latest run in brief (what ``/flgraph.json`` serves); ``{}`` before any run reported.

        >>> b = RunBoard(); b.feed({"kind": "round", "token": "t", "target_round": 1, "row": {"round": 1}})
        >>> b.summary()["round"], b.summary()["status"]
        (1, 'done')
        """
        rec = self.latest()
        if rec is None:
            return {}
        return {"token": rec.token, "status": rec.status, "round": rec.last_round, "target_round": rec.target_round,
                "clients": rec.clients(), "loss": rec.last("loss"), "accuracy": rec.last("accuracy"),
                "rounds": len(rec.rows), "columns": rec.columns(), "updated": rec.updated}


class DashboardPlugin(SchedulerPlugin):
    """A scheduler plugin that serves the FL page and keeps the runs' rows (see the module docstring).

    Registered once per scheduler by :class:`Dashboard` (``idempotent``: later runs reuse it).
    """

    name = "flgraph-dashboard"
    idempotent = True

    def __init__(self) -> None:
        self.board = RunBoard()
        self.path = ""

    async def start(self, scheduler: Any) -> None:
        from .dashboard_page import install

        self.path = install(scheduler, self.board)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC:
            self.board.feed(msg)


async def _send(client: Any, msg: dict[str, Any]) -> None:
    try:
        await client.scheduler.log_event(topic=TOPIC, msg=msg)
    except Exception as e:  # the page misses a row; the run does not care
        log.debug("flgraph dashboard: sending a row failed: %s", e)


class Dashboard:
    """The run callback behind ``Run(dashboard=True)``: installs the FL page and feeds it rows.

    Each row is sent without waiting (scheduled on the Dask client's event loop), so the round loop
    never waits for the dashboard. Any failure is logged once and turns the dashboard off for the run.

    >>> d = Dashboard()
    >>> d.link
    ''
    """

    def __init__(self) -> None:
        self.client: Any = None
        self.link = ""
        self._failed = False

    def on_start(self, run: Any) -> None:
        handle = getattr(run, "_handle", None)
        client = getattr(handle, "client", None)
        if client is None or getattr(client, "asynchronous", False):
            return  # a custom transport without a Dask client, or an async client: no page
        try:
            client.register_plugin(DashboardPlugin(), name=DashboardPlugin.name)
        except Exception as e:
            self._failed = True
            log.warning("flgraph: the FL dashboard page could not be set up on the scheduler (%s: %s); "
                        "the run goes on without it (install bokeh>=3.1 and flgraph where the scheduler runs)",
                        type(e).__name__, e)
            return
        self.client = client
        self.link = page_link(getattr(run, "dashboard_link", ""))
        self._post(run, {"kind": "start", "pipeline": repr(getattr(run, "pipeline", ""))[:4000],
                         "rows": [wire_row(r) for r in getattr(run, "history", [])][-10000:]})
        if self.link:
            log.info("flgraph run %s: FL dashboard at %s", getattr(run, "token", "?"), self.link)
            if getattr(run, "progress", False):
                print(f"flgraph: FL dashboard at {self.link}", file=sys.stderr, flush=True)

    def on_round(self, run: Any, row: dict[str, Any]) -> None:
        self._post(run, {"kind": "round", "row": wire_row(row)})

    def on_end(self, run: Any) -> None:
        self._post(run, {"kind": "end"})

    def _post(self, run: Any, msg: dict[str, Any]) -> None:
        if self.client is None or self._failed:
            return
        msg["token"] = str(getattr(run, "token", ""))
        msg["target_round"] = int(getattr(run, "target_round", 0))
        try:
            self.client.loop.add_callback(_send, self.client, msg)
        except Exception as e:
            self._failed = True
            log.warning("flgraph: the FL dashboard stopped receiving rows (%s); the run goes on", e)
