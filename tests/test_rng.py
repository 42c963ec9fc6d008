"""flgraph.rng: the seeds LocalTrain gives torch, computed for a round's clients in one vector pass."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flgraph.rng import client_torch_seed, torch_seed, torch_seeds


def test_client_torch_seed_is_torch_seed_whatever_the_order_the_round_or_the_thread():
    """LocalTrain computes a round's torch seeds together; each is still the client's own."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:53]
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

    same = ids.copy()  # the same round's ids in another array, then other ids for the same round
    assert client_torch_seed(7, 11, 9, same, 3) == torch_seed(7, 11, 9, int(ids[3]))
    other = ids[::-1].copy()
    assert client_torch_seed(7, 11, 9, other, 3) == torch_seed(7, 11, 9, int(other[3]))


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**32 - 1, 2**32, 2**64 + 3, 2**100 + 11, 2**130 + 7, 123456789012345])
@pytest.mark.parametrize("key", [(), (5,), (11, 4), (2**32 + 1, 0), (0, 2**31 - 1, 7)])
def test_torch_seeds_match_numpy_seed_sequence_bit_for_bit(seed: int, key: tuple[int, ...]) -> None:
    """The vector pass reimplements SeedSequence's last mixing step: it must give numpy's own seeds for
    run seeds of one to five 32-bit words, keys of any length and words, and any id up to 2**32 - 1."""
    rng = np.random.default_rng(seed % 1000)
    ids = np.concatenate([rng.integers(0, 1000, 20), [0, 1, 2**31, 2**32 - 1]]).astype(np.int64)
    want = [torch_seed(seed, *key, int(i)) for i in ids]
    assert [int(s) for s in torch_seeds(seed, key, ids)] == want
    assert [int(s) for s in torch_seeds(seed, key, ids.astype(np.uint32))] == want  # any integer dtype


def test_torch_seeds_outside_one_word_and_empty() -> None:
    """Ids that SeedSequence reads as two words take the one-by-one path; no ids give no seeds; negative
    ids are refused as SeedSequence refuses them, and ids that are not integers are refused too."""
    ids = np.array([3, 2**32, 2**40 + 9], np.int64)
    assert [int(s) for s in torch_seeds(0, (1, 2), ids)] == [torch_seed(0, 1, 2, int(i)) for i in ids]
    assert torch_seeds(0, (1, 2), np.array([], np.int64)).shape == (0,)
    wide = np.array([2**70, 5], dtype=object)  # Python ints past int64
    assert [int(s) for s in torch_seeds(0, (1,), wide)] == [torch_seed(0, 1, 2**70), torch_seed(0, 1, 5)]
    with pytest.raises(ValueError, match="non-negative"):
        torch_seeds(0, (1,), np.array([3, -1]))
    with pytest.raises(TypeError, match="must be integers"):
        torch_seeds(0, (1,), np.array([2.5]))
