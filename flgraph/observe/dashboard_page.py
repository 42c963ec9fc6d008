"""The Bokeh document of the FL dashboard page, served by the Dask scheduler (see :mod:`flgraph.observe.dashboard`).

:func:`install` adds the page to a running scheduler's web server (as Dask's own dashboard does for its
pages) and a link to it in the dashboard's navigation bar. :class:`FLPage` builds the document from a
:class:`~flgraph.observe.dashboard.RunBoard` and refreshes it twice a second while a browser shows it; nothing
runs on the scheduler for the page while no browser has it open.

Example:
    >>> from flgraph.observe.dashboard import RunBoard
    >>> from flgraph.observe.dashboard_page import FLPage
    >>> board = RunBoard()
    >>> board.feed({"kind": "round", "token": "t1", "target_round": 3,
    ...             "row": {"round": 1, "loss": 1.0, "accuracy": 0.5, "bytes_up": 10, "time_select": 0.01}})
    >>> page = FLPage(board)
    >>> page.refresh()
    True
    >>> "Round 1 of 3" in page.status.text, sorted(page.source.data)[:3]
    (True, ['accuracy', 'bytes_up', 'loss'])
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, NumeralTickFormatter
from bokeh.models.widgets import Div
from bokeh.plotting import figure
from tornado import web

from .dashboard import PAGE, RunBoard, RunRecord

__all__ = ["FLPage", "current_stage", "install"]

log = logging.getLogger("flgraph")

COLORS = {"loss": "#d62728", "test_loss": "#ff9896", "accuracy": "#2ca02c", "bytes_up": "#1f77b4",
          "bytes_up_raw": "#aec7e8", "bytes_down": "#ff7f0e", "bytes_broadcast": "#ffbb78",
          "round_time": "#000000", "clients_selected": "#7f7f7f", "clients_done": "#2ca02c",
          "clients_failed": "#d62728", "clients_stale": "#9467bd", "epsilon": "#8c564b"}
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_KEY = re.compile(r"^(?P<stage>[A-Za-z][\w-]*?)-r(?P<round>\d+)-")
_INTERVAL_MS = 500


def current_stage(scheduler: Any, token: str) -> tuple[int | None, str, int]:
    """(round, stage, tasks) of the run's tasks processing on the workers now; ``(None, "", 0)`` if none.

    Task keys look like ``local-train-r00012-c0001-<token>.<attempt>``.
    """
    counts: dict[tuple[int, str], int] = {}
    for ws in list(getattr(scheduler, "workers", {}).values()):
        for ts in list(getattr(ws, "processing", ())):
            key = str(getattr(ts, "key", ""))
            if token not in key:
                continue
            m = _KEY.match(key)
            if m:
                k = (int(m["round"]), m["stage"])
                counts[k] = counts.get(k, 0) + 1
    if not counts:
        return None, "", 0
    (rnd, stage), n = max(counts.items(), key=lambda kv: (kv[0][0], kv[1]))
    return rnd, stage, n


def _fig(title: str, x_label: str, y_label: str, name: str) -> Any:
    p = figure(title=title, name=name, height=260, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset",
               toolbar_location="above", x_axis_label=x_label, y_axis_label=y_label)
    return p


class FLPage:
    """The page's Bokeh models for one browser session; :meth:`refresh` brings them up to date."""

    def __init__(self, board: RunBoard, scheduler: Any = None) -> None:
        self.board = board
        self.scheduler = scheduler
        self.status = Div(name="fl-status", text="<h3>flgraph</h3><p>No flgraph run has reported yet.</p>",
                          sizing_mode="stretch_width")
        self.source = ColumnDataSource(data={}, name="fl-rounds")
        self.slowest = Div(name="fl-slowest", text="", sizing_mode="stretch_width")
        self.root = column(self.status, sizing_mode="stretch_width", name="fl-root")
        self._seen: tuple[Any, ...] = ()
        self._columns: list[str] = []
        self._token = ""

    # -- building ------------------------------------------------------------------------------------
    def _lines(self, p: Any, x: str, keys: Sequence[str], *, dashed: tuple[str, ...] = ()) -> None:
        for i, k in enumerate(keys):
            color = COLORS.get(k, _PALETTE[i % len(_PALETTE)])
            dash = "dashed" if k in dashed else "solid"
            p.line(x, k, source=self.source, color=color, line_width=3, line_dash=dash, legend_label=k,
                   name=f"line-{x}-{k}")
            p.scatter(x, k, source=self.source, color=color, size=5)
        if keys:
            p.legend.location = "top_left"
            p.legend.click_policy = "hide"
            p.legend.label_text_font_size = "9pt"

    def _figures(self, cols: list[str]) -> list[Any]:
        have = set(cols)
        rows: list[Any] = []
        curves: list[Any] = []
        for x, label in (("round", "round"), ("sim_time", "simulated time (s)")):
            if x not in have:
                continue
            suffix = "" if x == "round" else " (simulated time)"
            losses = [k for k in ("loss", "test_loss") if k in have]
            if losses:
                p = _fig("Loss" + suffix, label, "loss", f"fl-loss-{x}")
                self._lines(p, x, losses, dashed=("test_loss",))
                curves.append(p)
            if "accuracy" in have:
                p = _fig("Accuracy" + suffix, label, "accuracy", f"fl-accuracy-{x}")
                self._lines(p, x, ["accuracy"])
                curves.append(p)
        if "epsilon" in have:  # a privacy accountant's budget spent so far (flgraph.stages.PrivacyAccountant)
            p = _fig("Privacy spent (epsilon at the accountant's delta)", "round", "epsilon", "fl-epsilon")
            self._lines(p, "round", ["epsilon"])
            curves.append(p)
        for i in range(0, len(curves), 2):
            rows.append(row(*curves[i:i + 2], sizing_mode="stretch_width"))
        side: list[Any] = []
        moved = [k for k in ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_broadcast") if k in have]
        if moved:
            p = _fig("Bytes per round (up: compressed and raw; down: per client and broadcast)", "round", "bytes",
                     "fl-bytes")
            p.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
            self._lines(p, "round", moved, dashed=("bytes_up_raw", "bytes_broadcast"))
            side.append(p)
        stage_times = [k for k in cols if k.startswith("time_")] + (["round_time"] if "round_time" in have else [])
        if stage_times:
            p = _fig("Time per stage (s; client stages summed over clients)", "round", "seconds", "fl-times")
            self._lines(p, "round", stage_times, dashed=("round_time",))
            side.append(p)
        counts = [k for k in ("clients_selected", "clients_done", "clients_failed", "clients_stale") if k in have]
        if counts:
            p = _fig("Clients per round (selected, done, dropped, stale)", "round", "clients", "fl-clients")
            self._lines(p, "round", counts)
            side.append(p)
        for i in range(0, len(side), 2):
            rows.append(row(*side[i:i + 2], sizing_mode="stretch_width"))
        return rows

    # -- refreshing ----------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Update the models from the board and the scheduler; True when something changed."""
        rec = self.board.latest()
        stage = current_stage(self.scheduler, rec.token) if (rec is not None and self.scheduler is not None) \
            else (None, "", 0)
        seen = (rec.token, rec.version, stage) if rec is not None else ()
        if seen == self._seen:
            return False
        self._seen = seen
        if rec is None:
            return True
        self.status.text = self._status_html(rec, stage)
        if rec.token != self._token or (rec.version, rec.token) != getattr(self, "_data_at", None):
            cols = rec.columns()
            if "round" not in cols:
                cols = ["round", *cols]
            data = {k: [_num(r.get(k)) for r in rec.rows] for k in cols}
            if cols != self._columns or rec.token != self._token:
                self.source.data = data  # before the glyphs that read it exist
                self._columns, self._token = cols, rec.token
                self.root.children = [self.status, *self._figures(cols), self.slowest]
            else:
                self.source.data = data
            self._data_at = (rec.version, rec.token)
            self.slowest.text = _slowest_html(rec)
        return True

    def _status_html(self, rec: RunRecord, stage: tuple[int | None, str, int]) -> str:
        c = rec.clients()
        rnd, name, ntasks = stage
        if rec.status == "running":
            now = rnd if rnd is not None else rec.last_round + 1
            doing = (f"stage <b>{html.escape(name)}</b> ({ntasks} task{'s' if ntasks != 1 else ''} running)"
                     if name else "server stages in the driver")
            state = f"round {now} in progress: {doing}"
        else:
            state = rec.status
        parts = [f"<h3 style='margin:4px 0'>flgraph run {html.escape(rec.token)}: "
                 f"<span id='fl-round'>Round {rec.last_round} of {rec.target_round or rec.last_round}</span></h3>",
                 f"<p style='margin:2px 0'>{state}</p>",
                 "<p style='margin:2px 0'>last round: clients selected <b>{selected}</b>, done <b>{done}</b>, "
                 "dropped <b>{dropped}</b>, stale <b>{stale}</b>".format(**c)]
        for k in ("loss", "accuracy", "sim_time", "epsilon"):
            v = rec.last(k)
            if isinstance(v, int | float):
                parts[-1] += f"; {k} <b>{v:.4f}</b>"
        parts[-1] += "</p>"
        if rec.pipeline:
            parts.append(f"<pre style='margin:2px 0;font-size:9pt'>{html.escape(rec.pipeline)}</pre>")
        return "".join(parts)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _slowest_html(rec: RunRecord) -> str:
    raw = rec.rows[-1].get("slowest_clients") if rec.rows else None
    if not isinstance(raw, list) or not raw:
        return ""
    cells = []
    for item in raw:
        if isinstance(item, dict):
            cid, sec = item.get("client"), item.get("seconds", item.get("time"))
        elif isinstance(item, list | tuple) and len(item) >= 2:
            cid, sec = item[0], item[1]
        else:
            continue
        sec_s = f"{sec:.3f}" if isinstance(sec, int | float) else html.escape(str(sec))
        cells.append(f"<tr><td>{html.escape(str(cid))}</td><td style='text-align:right'>{sec_s}</td></tr>")
    return (f"<h4>Slowest clients of round {rec.last_round}</h4><table><tr><th>client</th><th>seconds</th></tr>"
            + "".join(cells) + "</table>")


def _document(board: RunBoard, scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """A Bokeh document factory in the shape Dask's dashboard uses (``(scheduler, extra, doc)``)."""
    page = FLPage(board, scheduler)
    page.refresh()
    doc.title = "Dask: flgraph"
    doc.add_root(page.root)
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except Exception as e:  # a Dask without those templates: the page still works, without the navbar
        log.debug("flgraph dashboard: Dask's page template is not available: %s", e)

    def tick() -> None:
        try:
            page.refresh()
        except Exception:
            log.exception("flgraph dashboard: refreshing the page failed")

    doc.add_periodic_callback(tick, _INTERVAL_MS)


class _SummaryHandler(web.RequestHandler):
    """``GET /flgraph.json``: the latest run in brief, with the stage processing now."""

    def initialize(self, board: RunBoard, scheduler: Any) -> None:
        self.board = board
        self.scheduler = scheduler

    def get(self) -> None:
        out = self.board.summary()
        if out:
            rnd, stage, ntasks = current_stage(self.scheduler, out["token"])
            out["stage"] = {"round": rnd, "stage": stage, "tasks": ntasks}
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(out))


def install(scheduler: Any, board: RunBoard) -> str:
    """Serve the FL page from ``scheduler``'s web server; returns its path (``/flgraph``).

    Raises :class:`~flgraph.errors.ConfigError` when the scheduler runs no Bokeh dashboard.
    """
    from tornado.ioloop import IOLoop

    from ..errors import ConfigError

    http = getattr(scheduler, "http_application", None)
    dask_apps = [a for a in getattr(http, "applications", []) if type(a).__name__.endswith("BokehTornado")]
    if http is None or not dask_apps:
        raise ConfigError("the Dask scheduler runs no Bokeh dashboard",
                          fix="install bokeh>=3.1 where the scheduler runs and start it with a dashboard address")
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables

    prefix = str(getattr(dask_apps[0], "prefix", "") or "")
    variables = template_variables(scheduler)
    pages = variables.get("pages")
    if isinstance(pages, list) and PAGE not in pages:
        pages.append(PAGE)  # the navbar of every Dask page links to the FL page
    app = BokehApplication({f"/{PAGE}": lambda s, extra, doc: _document(board, s, extra, doc)}, scheduler,
                           prefix=prefix, template_variables=variables)
    base = "/" + prefix.strip("/") if prefix.strip("/") else ""
    app.add_handlers(r".*", [(rf"{re.escape(base)}/{PAGE}\.json", _SummaryHandler, {"board": board,
                                                                                 "scheduler": scheduler})])
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    return f"{prefix.rstrip('/')}/{PAGE}"
