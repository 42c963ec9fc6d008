"""The named values a round passes between its stages, and how the pipeline check words them.

A value's name says where it lives:

==========================  =====================================================================
``clients``                 the round's chosen clients (written by ``Select``)
``params``                  the global params, always there; other server values (``control``) are
                            kept from round to round by the stage that declares them
``model``                   the global params on the clients (written by ``Broadcast``)
``on-clients:<v>``          server value ``v`` on the clients (``Broadcast("params", "v")``)
``update``, ``<v>``         per-client values, written by client stages (``update`` is the model
                            delta; ``control_delta``, ``evaluation``... are others)
``aggregate``               the aggregate of ``update`` (the model step)
``aggregate:<v>``           the aggregate of per-client value ``v``
``groups:<v>``              the per-group aggregates of ``v`` (``Aggregate(..., by="site")``)
==========================  =====================================================================

Example:
    >>> describe("on-clients:control"), provider("aggregate:control_delta")
    ("'control' on the clients", "a reducer of 'control_delta'")
"""

from __future__ import annotations

__all__ = ["aggregate_of", "describe", "groups_of", "on_clients", "provider"]

_KNOWN: dict[str, tuple[str, str]] = {
    "clients": ("the round's clients", "st.Select(clients=...)"),
    "model": ("the global model on the clients", "st.Broadcast()"),
    "update": ("a client update", "st.LocalTrain(...)"),
}


def on_clients(value: str) -> str:
    """The name of server value ``value`` once broadcast (``params`` is ``model``)."""
    return "model" if value == "params" else f"on-clients:{value}"


def aggregate_of(value: str) -> str:
    """The name of the aggregate of per-client value ``value``."""
    return "aggregate" if value == "update" else f"aggregate:{value}"


def groups_of(value: str) -> str:
    """The name of the per-group aggregates of per-client value ``value``."""
    return f"groups:{value}"


def describe(name: str) -> str:
    """How an error message names a value."""
    if name in _KNOWN:
        return _KNOWN[name][0]
    kind, _, value = name.partition(":")
    if value and kind == "on-clients":
        return f"'{value}' on the clients"
    if value and kind == "aggregate":
        return f"the aggregate of '{value}'"
    if value and kind == "groups":
        return f"the per-group aggregates of '{value}'"
    return repr(name)


def provider(name: str) -> str:
    """What writes a value, for the ``fix`` of an error message."""
    if name in _KNOWN:
        return _KNOWN[name][1]
    kind, _, value = name.partition(":")
    if value and kind == "on-clients":
        return f"st.Broadcast('params', '{value}')"
    if value and kind == "aggregate":
        return f"a reducer of '{value}'"
    if value and kind == "groups":
        return f"st.Aggregate(..., by=...) over '{value}'"
    return "a stage that provides it"
