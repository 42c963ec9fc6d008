"""How a pipeline shows itself: one text form for terminals, one HTML picture for notebooks.

The text form's first line is the composition as written; the lines under it list, per branch, where
each stage runs. The HTML picture draws each branch as a row of boxes coloured by kind, a fan-out as a
column of reducers labelled with the per-client value each reduces, and tiers as reducers in a row.

Example:
    >>> from flgraph import stages as st
    >>> p = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()
    >>> print(repr(p).splitlines()[-1])
      [reduce] aggregate
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .stage import Stage

if TYPE_CHECKING:
    from .check import Branch
    from .pipeline import Pipeline

__all__ = ["html_of", "text_of"]

COLORS = {"server": "#dbeafe", "client": "#dcfce7", "reduce": "#fde68a"}
ARROW = ' <span style="font-size:18px">&rarr;</span> '


def _steps_text(steps: Any) -> str:
    parts = []
    for st in steps:
        if isinstance(st, Mapping):
            inner = ", ".join(f"{v!r}: " + " >> ".join(repr(s) for s in sub.stages) for v, sub in st.items())
            parts.append("{" + inner + "}")
        else:
            parts.append(repr(st))
    return " >> ".join(parts)


def _reduce_line(branch: Branch) -> str:
    rs = branch.reductions
    if len(rs) == 1 and rs[0].value == "update" and len(rs[0].tiers) == 1:
        return rs[0].stage.name
    out = []
    for r in rs:
        tiers = " -> ".join(t.name + (f" by {t.by}" if t.by else "") for t in r.tiers)
        out.append(f"{r.value}: {tiers}")
    return "; ".join(out)


def text_of(p: Pipeline) -> str:
    """The text form (``repr``) of a pipeline."""
    if p.branches is not None:
        first = " | ".join(f"({_steps_text(b.steps)})" for b in p.branches)
    else:
        first = _steps_text(p.steps)
    lines = ["Pipeline: " + first]
    several = len(p.segments.branches) > 1
    for branch in p.segments.branches:
        pad = "  "
        if several:
            lines.append(f"  branch {branch.name!r}:")
            pad = "    "
        for label, group in (("server, before", [s.name for s in branch.before]),
                             ("client", [s.name for s in branch.clients]),
                             ("reduce", [_reduce_line(branch)] if branch.reductions else []),
                             ("server, after", [s.name for s in branch.after])):
            if group:
                lines.append(f"{pad}[{label}] " + " -> ".join(group))
    return "\n".join(lines)


def _box(s: Stage) -> str:
    tip = html.escape(repr(s))
    return (f'<div title="{tip}" style="display:inline-block;padding:6px 10px;border:1px solid #555;'
            f'border-radius:6px;background:{COLORS[s.kind]};font-family:monospace">'
            f"<b>{html.escape(type(s).__name__)}</b><br><small>{s.kind}</small></div>")


def _row(steps: Any) -> str:
    cells = []
    for st in steps:
        if isinstance(st, Mapping):
            rows = []
            width = max(len(v) for v in st)  # one column of labels, so the reducers line up
            for value, sub in st.items():
                label = (f'<small style="font-family:monospace;display:inline-block;min-width:{width}ch">'
                         f"{html.escape(value)}</small> ")
                rows.append('<div style="margin:3px 0">' + label + ARROW.join(_box(s) for s in sub.stages)
                            + "</div>")
            cells.append('<div style="display:inline-block;vertical-align:middle;border-left:2px solid #888;'
                         'padding-left:6px">' + "".join(rows) + "</div>")
        else:
            cells.append(_box(st))
    return ARROW.join(cells)


def html_of(p: Pipeline) -> str:
    """The HTML picture of a pipeline (``_repr_html_``): a notebook shows it."""
    legend = " ".join(f'<span style="background:{c};padding:0 6px">{k}</span>' for k, c in COLORS.items())
    if p.branches is None:
        return "<div>" + _row(p.steps) + f"<br><small>{legend}</small></div>"
    rows = []
    for branch, part in zip(p.segments.branches, p.branches):
        rows.append(f'<div style="margin:4px 0"><small style="font-family:monospace">{html.escape(branch.name)}'
                    "</small> " + _row(part.steps) + "</div>")
    return ("<div>" + '<div style="border-left:3px double #888;padding-left:6px">' + "".join(rows) + "</div>"
            + f"<small>{legend}</small></div>")
