"""Unit tests for flgraph.tree: the fixed reduction tree that makes sums independent of chunking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flgraph.tree import Incremental, assemble, chunks, cover, evaluate

N_MAX = 70


def _values(n: int, seed: int = 0) -> list[np.ndarray]:
    """float32 vectors of wildly different magnitudes, so float addition order shows in the result."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-4, 5, size=(n, 1))
    return list((rng.standard_normal((n, 16)) * scale).astype(np.float32))


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = a + b
    assert out.dtype == np.float32
    return out


def _add_in_place(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Like the reducers: may reuse (mutate) its left argument."""
    a += b
    return a


def _is_node(n: int, lo: int, hi: int) -> bool:
    a, b = 0, n
    while True:
        if (a, b) == (lo, hi):
            return True
        if b - a <= 1 or not (a <= lo and hi <= b):
            return False
        mid = (a + b) // 2
        if hi <= mid:
            b = mid
        elif lo >= mid:
            a = mid
        else:
            return False


def _parent(n: int, lo: int, hi: int) -> tuple[int, int] | None:
    a, b, parent = 0, n, None
    while (a, b) != (lo, hi):
        parent = (a, b)
        mid = (a + b) // 2
        a, b = (a, mid) if hi <= mid else (mid, b)
    return parent


def _chunk_nodes(n: int, chunk_list: list[tuple[int, int]], leaf, combine) -> dict[tuple[int, int], np.ndarray]:
    """What the chunk tasks return: each chunk's cover nodes, evaluated on the chunk's own."""
    nodes = {}
    for a, b in chunk_list:
        for lo, hi in cover(n, a, b):
            assert (lo, hi) not in nodes
            nodes[(lo, hi)] = evaluate(lo, hi, leaf, combine)
    return nodes


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("n", range(1, N_MAX + 1))
def test_every_chunk_size_gives_the_bit_identical_sum(n):
    vals = _values(n, seed=n)
    reference = evaluate(0, n, vals.__getitem__, _add)
    assert reference.dtype == np.float32
    for size in range(1, n + 1):
        nodes = _chunk_nodes(n, chunks(n, 1, size=size), vals.__getitem__, _add)
        got = assemble(n, nodes, _add)
        assert got.tobytes() == reference.tobytes(), f"n={n} chunk size={size}"


@pytest.mark.parametrize("n", range(1, N_MAX + 1, 3))
def test_random_irregular_chunkings_and_in_place_combine_give_the_bit_identical_sum(n):
    vals = _values(n, seed=1000 + n)
    reference = evaluate(0, n, vals.__getitem__, _add)
    rng = np.random.default_rng(n)
    for _ in range(20):
        cuts = sorted(set(rng.integers(1, n, size=rng.integers(0, n)).tolist())) if n > 1 else []
        bounds = [0, *cuts, n]
        chunk_list = list(itertools.pairwise(bounds))
        # leaves are fresh copies so the in-place combine never touches vals
        nodes = _chunk_nodes(n, chunk_list, lambda i: vals[i].copy(), _add_in_place)
        # nodes arrive in any order
        shuffled = dict(sorted(nodes.items(), key=lambda kv: rng.random()))
        got = assemble(n, shuffled, _add_in_place)
        assert got.tobytes() == reference.tobytes(), chunk_list


@pytest.mark.parametrize("n", range(1, N_MAX + 1, 7))
def test_default_chunks_for_every_worker_count_give_the_bit_identical_sum(n):
    vals = _values(n, seed=7 * n)
    reference = evaluate(0, n, vals.__getitem__, _add)
    for parts in range(1, n + 3):
        nodes = _chunk_nodes(n, chunks(n, parts), vals.__getitem__, _add)
        assert assemble(n, nodes, _add).tobytes() == reference.tobytes()


def test_the_check_is_sensitive_naive_chunked_sums_differ():
    """Sanity of the test above: summing each chunk left-to-right (no tree) changes the float32 bits."""
    n = 64
    vals = _values(n, seed=3)
    reference = evaluate(0, n, vals.__getitem__, _add)
    differs = 0
    for size in range(1, n + 1):
        partials = []
        for a, b in chunks(n, 1, size=size):
            acc = vals[a].copy()
            for i in range(a + 1, b):
                acc = acc + vals[i]
            partials.append(acc)
        total = partials[0]
        for p in partials[1:]:
            total = total + p
        differs += total.tobytes() != reference.tobytes()
    assert differs > 0


def test_evaluate_follows_the_tree_shape():
    # a non-commutative, non-associative combine exposes the exact bracketing
    shape = evaluate(0, 5, str, lambda a, b: f"({a}{b})")
    assert shape == "((01)(2(34)))"
    assert evaluate(3, 4, str, lambda a, b: a + b) == "3"
    assert evaluate(0, 70, lambda i: i, lambda a, b: a + b) == sum(range(70))


# --------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("n", range(1, N_MAX + 1))
def test_default_chunks_are_single_tree_nodes(n):
    for parts in range(1, 80):
        cs = chunks(n, parts)
        assert cs[0][0] == 0 and cs[-1][1] == n
        assert all(a < b for a, b in cs)
        assert all(cs[i][1] == cs[i + 1][0] for i in range(len(cs) - 1)), "contiguous, in order"
        for a, b in cs:
            assert _is_node(n, a, b), (n, parts, (a, b))
            assert cover(n, a, b) == [(a, b)], "exactly one partial per chunk"
        assert min(parts, n) <= len(cs) < 2 * parts


def test_chunks_examples():
    assert chunks(100, 2) == [(0, 50), (50, 100)]
    assert chunks(10, 1) == [(0, 10)]
    assert chunks(5, 4) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert chunks(3, 100) == [(0, 1), (1, 2), (2, 3)]
    assert chunks(10, 3, size=4) == [(0, 4), (4, 8), (8, 10)]
    assert chunks(4, 2, size=10) == [(0, 4)]


@pytest.mark.parametrize("n", [0, -3])
def test_chunks_of_nothing(n):
    assert chunks(n, 4) == []
    assert chunks(n, 4, size=2) == []


@pytest.mark.parametrize("size", [0, -1])
def test_chunks_refuse_bad_size(size):
    with pytest.raises(ValueError, match=f"chunk size must be >= 1, got {size}"):
        chunks(10, 2, size=size)


# --------------------------------------------------------------------------- cover


def test_cover_examples():
    assert cover(10, 0, 10) == [(0, 10)]
    # [0,10) -> [0,5) [5,10); [0,5) -> [0,2) [2,5) -> [2,3) [3,5); [5,10) -> [5,7) [7,10) -> [7,8) [8,10)
    # ((5, 8) is not a node of this tree, so the cover of [3, 8) has three pieces)
    assert cover(10, 3, 8) == [(3, 5), (5, 7), (7, 8)]
    assert cover(1, 0, 1) == [(0, 1)]
    assert cover(10, 4, 5) == [(4, 5)]
    assert cover(10, 0, 5) == [(0, 5)]
    assert cover(10, 5, 10) == [(5, 10)]


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_cover_of_empty_ranges(n):
    for a in range(n + 1):
        assert cover(n, a, a) == []


@pytest.mark.parametrize("n", range(1, 40))
def test_cover_is_exact_maximal_and_ordered(n):
    for a in range(n + 1):
        for b in range(a, n + 1):
            nodes = cover(n, a, b)
            positions = [i for lo, hi in nodes for i in range(lo, hi)]
            assert positions == list(range(a, b))
            for lo, hi in nodes:
                assert _is_node(n, lo, hi)
                parent = _parent(n, lo, hi)
                assert parent is None or not (a <= parent[0] and parent[1] <= b), "not maximal"


@pytest.mark.parametrize(("n", "a", "b"), [(10, -1, 3), (10, 5, 4), (10, 0, 11), (0, 0, 1), (3, 4, 4)])
def test_cover_refuses_ranges_outside(n, a, b):
    with pytest.raises(ValueError, match=rf"range \[{a}, {b}\) is not inside \[0, {n}\)"):
        cover(n, a, b)


# --------------------------------------------------------------------------- assemble


def test_assemble_returns_the_root_directly_and_combines_only_what_it_must():
    calls = []

    def combine(a, b):
        calls.append((a, b))
        return a + b

    assert assemble(10, {(0, 10): 45}, combine) == 45 and calls == []
    assert assemble(10, {(0, 5): 10, (5, 10): 35}, combine) == 45
    assert calls == [(10, 35)]


def test_assemble_missing_position_raises():
    nodes = {(0, 5): 1, (5, 7): 2, (8, 10): 3}  # position 7 is missing
    with pytest.raises(KeyError, match="no value covers position 7"):
        assemble(10, nodes, lambda a, b: a + b)
    with pytest.raises(KeyError, match="no value covers position 0"):
        assemble(3, {}, lambda a, b: a + b)


# --------------------------------------------------------------------------- incremental assembly of nodes


@pytest.mark.parametrize("n", [1, 2, 7, 50, 100, 257])
def test_nodes_added_as_they_arrive_give_the_bit_identical_root(n):
    """The driver folds each arriving node into the round's tree (work sharing splits chunks at random
    points): any split into pieces, any arrival order, the same bits as assembling them all at the end."""
    values = _values(n, seed=n)
    rng = np.random.default_rng(n)
    expected = assemble(n, _chunk_nodes(n, [(0, n)], lambda p: values[p].copy(), _add_in_place), _add_in_place)
    for _ in range(20):
        cuts = sorted({0, n, *rng.integers(0, n + 1, size=rng.integers(0, 6)).tolist()})
        nodes = _chunk_nodes(n, list(itertools.pairwise(cuts)), lambda p: values[p].copy(), _add_in_place)
        order = list(nodes)
        rng.shuffle(order)
        inc = Incremental(n, _add_in_place, check=True)
        for node in order:
            inc.add_node(node, nodes[node])
        assert inc.covered == n
        assert np.array_equal(inc.root(), expected)


def test_incremental_refuses_overlaps_and_ranges_that_are_not_nodes():
    inc = Incremental(10, _add, check=True)
    inc.add_node((0, 5), np.ones(2, np.float32))
    for bad in [(0, 5), (2, 3), (0, 10), (3, 7)]:  # again, inside it, around it, not a node
        with pytest.raises(ValueError):
            inc.add_node(bad, np.ones(2, np.float32))
    inc.add_node((5, 7), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="overlaps"):
        inc.add(6, np.ones(2, np.float32))
    assert inc.covered == 7
    with pytest.raises(ValueError, match="not a position"):
        Incremental(4, _add).add(4, 0)
