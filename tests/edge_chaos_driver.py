"""The driver of tests/test_chaos_edge.py: FedBuff over edge agents, checkpointed, its gateway on a fixed
port so that the agents find a resumed driver where they lost the killed one.

``python edge_chaos_driver.py run|resume RUN.zarr PORT KEYS ROUNDS OUT.json``: ``run`` starts the run (the
test arms the fault hook, so it dies mid-run), ``resume`` continues it from its last snapshot; each writes
what it counted (every processed dispatch index, those still in flight, the dispatches made) to OUT.json
when it ends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

AGENTS = 4
DATA = dict(num_clients=AGENTS, samples_per_client=16, num_features=8, num_classes=3)
CONFIG = {**DATA, "hidden": "16", "data_seed": 0, "model_seed": 0}  # what flgraph.transports.zmq.tasks:synthetic builds


def main(mode: str, path: str, port: int, keys: Path, rounds: int, out: Path) -> None:
    from flgraph.transports.zmq import ZmqTransport

    import flgraph as fg

    data = fg.data.FederatedDataset.from_function(
        fg.data.synthetic_classification(**DATA, seed=0, test_samples=0).load, client_ids=list(range(AGENTS)))
    transport = ZmqTransport(f"tcp://127.0.0.1:{port}", deadline_s=30, config=CONFIG, heartbeat_s=0.5, liveness=6,
                             secret_key=keys / "gateway.key_secret", allow=keys / "allow")
    transport.gateway.start()
    if mode == "run":
        pipeline = fg.recipes.fedbuff(concurrency=3, buffer=2, batch_size=8, lr=0.1, evaluate_every=None)
        run = fg.Run(pipeline, model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=transport,
                     progress=False, dashboard=False, evaluate="never", on_client_error="drop",
                     checkpoint=fg.Checkpoints(path, every=1, keep_last=2))
    else:
        run = fg.resume(path, transport=transport, data=data, progress=False, dashboard=False)
    with run:
        transport.gateway.wait_for(clients=range(AGENTS), timeout=60)
        run.fit(rounds=rounds if mode == "run" else run.remaining)
        key = next(k for k in run.state.stage_states if k.endswith("buffered-aggregate"))
        state = run.state.stage_states[key]
        inflight = [int(i) for i in np.asarray(state["inflight"]).reshape(-1, 4)[:, 0]]
        out.write_text(json.dumps({
            "round": run.round,
            "arrivals": [int(i) for row in run.history for i in row["arrivals"]],
            "clients_done": [int(row["clients_done"]) for row in run.history],
            "inflight": inflight, "dispatched": int(state["dispatched"]),
            "rejected": int(transport.gateway.counters["rejected"])}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
