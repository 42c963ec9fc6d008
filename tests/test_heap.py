"""The long-lived heap is frozen while rounds run (driver) and while a run holds the workers, and thawed after."""

from __future__ import annotations

import gc
import threading

import flgraph as fg
from flgraph import stages as st
from flgraph.local import heap


def test_frozen_nests_and_thaws_when_the_outermost_block_ends():
    assert gc.get_freeze_count() == 0
    keep = [object() for _ in range(10)]  # tracked containers are what the collector walks
    with heap.frozen():
        assert gc.get_freeze_count() > 0
        with heap.frozen():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the inner block's end leaves the outer one frozen
        assert heap.thaw() > 0  # a worker's thaw does not undo a block still running
    assert gc.get_freeze_count() == 0
    del keep


def test_frozen_thaws_on_error_and_across_threads():
    try:
        with heap.frozen():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.get_freeze_count() == 0
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with heap.frozen():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with heap.frozen():
        pass
    assert gc.get_freeze_count() > 0  # the other thread's block still runs
    leave.set()
    t.join(10)
    assert gc.get_freeze_count() == 0


def test_a_run_freezes_its_workers_and_the_driver_only_while_it_needs_to(client2):
    data = fg.data.synthetic_classification(num_clients=20, samples_per_client=8, num_features=5,
                                            num_classes=3, alpha=0.5, seed=1, test_samples=20)
    seen: list[int] = []

    class Probe:
        def on_round(self, run, row):
            seen.append(gc.get_freeze_count())

    p = st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(1, batch_size=4) >> st.Aggregate()
    with fg.Run(p, model=fg.models.mlp(5, [4], 3, seed=0), data=data, seed=0, cluster=client2,
                progress=False, evaluate="never", callbacks=[Probe()]) as run:
        run.fit(2)
        assert len(seen) == 2 and all(n > 0 for n in seen)  # frozen during the rounds
        assert gc.get_freeze_count() == 0  # thawed when fit returns
        counts = client2.run(gc.get_freeze_count)
        assert len(counts) == 2 and all(n > 0 for n in counts.values())
    assert all(n == 0 for n in client2.run(gc.get_freeze_count).values())  # thawed when the run closes
