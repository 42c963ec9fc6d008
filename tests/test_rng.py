"""flgraph.rng: the seeds LocalTrain gives torch, computed a block of clients at a time."""

from __future__ import annotations

import threading

import numpy as np

from flgraph.rng import SEED_BLOCK, client_torch_seed, torch_seed


def test_client_torch_seed_is_torch_seed_whatever_the_order_the_round_or_the_thread():
    """LocalTrain computes clients' torch seeds a block at a time; each is still the client's own."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[: 3 * SEED_BLOCK + 5]
    for rnd in (4, 5, 4):  # a new round replaces the kept seeds; coming back recomputes them
        order = rng.permutation(len(ids))  # owners from the front, helpers from the back, in any order
        for pos in order:
            assert client_torch_seed(7, 11, rnd, ids, int(pos)) == torch_seed(7, 11, rnd, int(ids[pos]))
    assert client_torch_seed(8, 11, 4, ids, 0) == torch_seed(8, 11, 4, int(ids[0]))  # another run seed
    assert client_torch_seed(7, 12, 4, ids, 0) == torch_seed(7, 12, 4, int(ids[0]))  # another stage
    seen: list[bool] = []

    def other_thread() -> None:
        seen.append(all(client_torch_seed(7, 11, 9, ids, p) == torch_seed(7, 11, 9, int(ids[p]))
                        for p in range(len(ids))))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == [True]
