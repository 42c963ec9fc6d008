"""One fixed reduction tree per round, so sums do not depend on chunking or worker count.

The round's ``n`` client positions are the leaves of a binary tree: node ``[lo, hi)`` splits at
``(lo + hi) // 2``. A chunk of clients ``[a, b)`` returns the values of the maximal tree nodes that
cover it (:func:`cover`); the driver (or combine tasks) assembles the root from whatever nodes arrive
(:func:`assemble`, or :class:`Incremental` as they arrive). Every floating-point addition happens at the
same node whatever the chunking, so the result is bit-identical with 1 or 100 workers and any chunk size.
With the default chunking (:func:`chunks`) each chunk is exactly one node and returns one partial.

Example:
    >>> from flgraph.tree import cover, chunks, assemble
    >>> cover(10, 0, 10), cover(10, 3, 8)
    ([(0, 10)], [(3, 5), (5, 7), (7, 8)])
    >>> chunks(100, 2)
    [(0, 50), (50, 100)]
    >>> nodes = {blk: sum(range(*blk)) for c in chunks(10, 3) for blk in cover(10, *c)}
    >>> assemble(10, nodes, lambda a, b: a + b)
    45
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["Incremental", "assemble", "assemble_partial", "chunks", "cover", "evaluate"]

T = TypeVar("T")
Node = tuple[int, int]


def cover(n: int, a: int, b: int) -> list[Node]:
    """The maximal nodes of the tree over ``[0, n)`` that exactly cover ``[a, b)``, left to right."""
    out: list[Node] = []

    def walk(lo: int, hi: int) -> None:
        if b <= lo or hi <= a:
            return
        if a <= lo and hi <= b:
            out.append((lo, hi))
            return
        mid = (lo + hi) // 2
        walk(lo, mid)
        walk(mid, hi)

    if not 0 <= a <= b <= n:
        raise ValueError(f"range [{a}, {b}) is not inside [0, {n})")
    walk(0, n)
    return out


def chunks(n: int, parts: int, size: int | None = None) -> list[Node]:
    """Split ``n`` positions into chunks.

    With ``size`` given: consecutive chunks of that many positions (any size works; a chunk that is not
    one tree node returns a few partials). Otherwise: the tree's nodes at the shallowest depth that has
    at least ``parts`` nodes, so that each chunk is one node and returns one partial.
    """
    if n <= 0:
        return []
    if size is not None:
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    level = [(0, n)]
    while len(level) < parts and any(hi - lo > 1 for lo, hi in level):
        nxt: list[Node] = []
        for lo, hi in level:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                nxt += [(lo, mid), (mid, hi)]
            else:
                nxt.append((lo, hi))
        level = nxt
    return level


def evaluate(lo: int, hi: int, leaf: Callable[[int], T], combine: Callable[[T, T], T]) -> T:
    """The value of node ``[lo, hi)``: leaves left to right, combined at the tree's nodes."""
    if hi - lo == 1:
        return leaf(lo)
    mid = (lo + hi) // 2
    left = evaluate(lo, mid, leaf, combine)
    return combine(left, evaluate(mid, hi, leaf, combine))


def assemble(n: int, nodes: Mapping[Node, Any], combine: Callable[[Any, Any], Any]) -> Any:
    """The root value from node values that together cover ``[0, n)`` exactly once."""

    def walk(lo: int, hi: int) -> Any:
        if (lo, hi) in nodes:
            return nodes[(lo, hi)]
        if hi - lo <= 1:
            raise KeyError(f"no value covers position {lo}")
        mid = (lo + hi) // 2
        left = walk(lo, mid)
        return combine(left, walk(mid, hi))

    return walk(0, n)


def assemble_partial(n: int, nodes: Mapping[Node, Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Like :func:`assemble`, for nodes that may leave positions uncovered (clients that failed or were
    dropped): a missing leaf counts as nothing, so a node with one child present is that child, as in the
    round's own tree. ``None`` when no node is given.

    Example:
        >>> assemble_partial(4, {(0, 2): 1, (3, 4): 5}, lambda a, b: a + b), assemble_partial(3, {}, max)
        (6, None)
    """

    def walk(lo: int, hi: int) -> Any:
        if (lo, hi) in nodes:
            return nodes[(lo, hi)]
        if hi - lo <= 1:
            return None
        mid = (lo + hi) // 2
        left, right = walk(lo, mid), walk(mid, hi)
        if left is None or right is None:
            return right if left is None else left
        return combine(left, right)

    return walk(0, n) if nodes else None


class Incremental:
    """Leaves (or whole tree nodes) added in any order, combined at the tree's nodes as soon as both children
    are there: the same additions, operands and order as :func:`assemble`, so the same root, bit for bit.

    ``done`` holds the maximal finished nodes: after the leaves of ``[a, b)`` were added (in any order),
    exactly ``cover(n, a, b)``; :func:`assemble` takes them. Memory: O(depth) values for leaves added in
    order from either end. ``covered`` counts the positions added. A range that is not a node of the tree
    is refused (ValueError), and with ``check=True`` (for nodes that come from elsewhere) so is a node that
    overlaps positions already added.

    Example:
        >>> inc = Incremental(5, lambda a, b: a + b)
        >>> for pos in (4, 3, 2):
        ...     inc.add(pos, pos)
        >>> sorted(inc.done.items()), cover(5, 2, 5)
        ([((2, 5), 9)], [(2, 5)])
        >>> inc.add_node((0, 2), 1)           # the finished node [0, 2), from another worker
        >>> inc.covered, inc.root()
        (5, 10)
    """

    def __init__(self, n: int, combine: Callable[[Any, Any], Any], check: bool = False) -> None:
        self.n = n
        self.combine = combine
        self.done: dict[Node, Any] = {}
        self.covered = 0
        self._check = check
        self._taken: set[Node] = set()  # the nodes added (with check)
        self._under: set[Node] = set()  # the nodes added and their ancestors: O(depth) overlap checks

    def add(self, pos: int, value: Any) -> None:
        """Add leaf ``pos``; combine it with finished siblings up the tree (left operand first)."""
        if self._check:
            self.add_node((pos, pos + 1), value)
            return
        path = self._leaf_path(pos)
        if path[-1] != (pos, pos + 1):
            raise ValueError(f"{pos} is not a position of the tree over [0, {self.n})")
        self.covered += 1
        self._climb(path, value)

    def add_node(self, node: Node, value: Any) -> None:
        """Add the finished value of tree node ``node`` (its positions not added before); combine it with
        finished siblings up the tree (left operand first)."""
        a, b = node = (int(node[0]), int(node[1]))
        path = [(0, self.n)]
        while path[-1] != (a, b):
            lo, hi = path[-1]
            mid = (lo + hi) // 2
            if hi - lo <= 1 or not (lo <= a < b <= hi):
                raise ValueError(f"[{a}, {b}) is not a node of the tree over [0, {self.n})")
            if b <= mid:
                path.append((lo, mid))
            elif a >= mid:
                path.append((mid, hi))
            else:
                raise ValueError(f"[{a}, {b}) is not a node of the tree over [0, {self.n})")
        if self._check:
            if node in self._under or any(p in self._taken for p in path):  # it holds, or lies in, one added
                raise ValueError(f"[{a}, {b}) overlaps positions added before")
            self._taken.add(node)
            self._under.update(path)
        self.covered += b - a
        self._climb(path, value)

    def partners(self, pos: int) -> set[Node]:
        """The finished nodes that leaf ``pos``, once added, will be combined with (its siblings up the
        tree, as far as they are finished).

        Example:
            >>> inc = Incremental(8, lambda a, b: a + b)
            >>> for pos in (0, 1, 2, 4):
            ...     inc.add(pos, pos)
            >>> sorted(inc.partners(3)), sorted(inc.partners(5))
            ([(0, 2), (2, 3)], [(4, 5)])
        """
        return {sibling for _, sibling, _ in self._finished_siblings(self._leaf_path(pos))}

    def _leaf_path(self, pos: int) -> list[Node]:
        """The nodes from the root down to the one-position node holding ``pos``."""
        path = [(0, self.n)]
        while path[-1][1] - path[-1][0] > 1:
            lo, hi = path[-1]
            mid = (lo + hi) // 2
            path.append((lo, mid) if pos < mid else (mid, hi))
        return path

    def _finished_siblings(self, path: list[Node]) -> Iterator[tuple[Node, Node, Node]]:
        """(node, its finished sibling, their parent) up ``path`` (root first) from its last node, as long
        as the siblings are finished."""
        node = path[-1]
        for lo, hi in reversed(path[:-1]):
            mid = (lo + hi) // 2
            sibling = (mid, hi) if node == (lo, mid) else (lo, mid)
            if sibling not in self.done:
                return
            yield node, sibling, (lo, hi)
            node = (lo, hi)

    def _climb(self, path: list[Node], value: Any) -> None:
        """Combine the value of node ``path[-1]`` with finished siblings up ``path`` (root first)."""
        top = path[-1]
        for node, sibling, parent in self._finished_siblings(path):
            other = self.done.pop(sibling)
            value = self.combine(value, other) if node[0] < sibling[0] else self.combine(other, value)
            top = parent
        self.done[top] = value

    def root(self) -> Any:
        """The value of ``[0, n)`` (every leaf added)."""
        return self.done[(0, self.n)]
