"""The task the conformance suite asks of an agent (any implementation must provide the same function):

* ``config["fail"]`` true: answer ``error`` with code ``task-failed`` (and the task's ``round`` and ``task``);
* otherwise a ``result`` with ``kind: "delta"``, ``delta = -factor * params`` in the carrier dtype
  (``factor = config["factor"]``, a power of two in the suite, so the product is exact in any language),
  ``num_samples = config["samples"]`` and ``metrics = {"round": round}``.

The Python agent runs it with ``flgraph edge --task conformance_task:scale``.
"""

from __future__ import annotations

from flgraph.transports.zmq.agent import EdgeResult, EdgeTask


def scale(task: EdgeTask) -> EdgeResult:
    if task.config.get("fail"):
        raise RuntimeError("the conformance suite asked this task to fail")
    flat = task.params.flat
    delta = (-float(task.config.get("factor", 1.0)) * flat).astype(flat.dtype)
    return EdgeResult(num_samples=int(task.config.get("samples", 1)), delta=delta,
                      metrics={"round": float(task.round)})
