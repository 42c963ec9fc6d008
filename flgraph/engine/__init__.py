"""Engines: what runs a round's graph, round after round.

* :mod:`flgraph.engine.sync` — synchronous rounds (each branch's server stages, one client pass on a
  transport, the reducers and their tiers, the server stages after them);
* :mod:`flgraph.engine.fanout` — several reducers, branches and tiers in one client pass, each along its
  own fixed tree.

Example:
    >>> from flgraph import stages as st
    >>> from flgraph.engine import consumers_of
    >>> g = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()).check()
    >>> [(c.branch, c.value) for c in consumers_of(g)]
    [(0, 'update')]
"""

from .contracts import PlansAhead, RunsGraphs, Transport
from .sync import RunState, SyncEngine, branch_row, client_row, consumers_of

__all__ = ["PlansAhead", "RunState", "RunsGraphs", "SyncEngine", "Transport", "branch_row", "client_row",
           "consumers_of"]
