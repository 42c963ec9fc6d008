"""Check that our W1 (``bench/w1.py``) does exactly the work of the shared reference ``w1common.py``.

Compares, bit for bit: client data for a sample of clients, the test set, the sampler for rounds 1..20,
the initial weights of both models, and the weights after one client's local training (both models)
from the same start. Prints one ``OK`` (or ``MISMATCH``) line per check; exits 1 if any check fails.

The reference is found at ``<checkout>/../shared/bench`` (i.e. ``/work/shared/bench`` for
``/work/main``), or in the folder named by the environment variable ``FLGRAPH_SHARED`` when set
(either the ``shared`` folder or its ``bench`` folder).

Usage (from the repository root)::

    .venv/bin/python bench/check_w1.py
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import w1  # noqa: E402


def shared_bench_dir() -> Path:
    """The folder holding the reference ``w1common.py``."""
    env = os.environ.get("FLGRAPH_SHARED")
    candidates = [Path(env), Path(env) / "bench"] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "bench")
    for c in candidates:
        if (c / "w1common.py").is_file():
            return c
    raise SystemExit(f"w1common.py not found in {[str(c) for c in candidates]}; set FLGRAPH_SHARED")


def load_reference() -> ModuleType:
    sys.path.insert(0, str(shared_bench_dir()))
    import w1common

    return w1common


class Mismatch(Exception):
    pass


def same_arrays(what: str, ours: list[np.ndarray], ref: list[np.ndarray]) -> None:
    if len(ours) != len(ref):
        raise Mismatch(f"{what}: {len(ours)} arrays, reference {len(ref)}")
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.dtype != b.dtype or a.shape != b.shape:
            raise Mismatch(f"{what}[{i}]: {a.dtype}{a.shape} vs reference {b.dtype}{b.shape}")
        if not np.array_equal(a, b):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            raise Mismatch(f"{what}[{i}]: values differ (max abs diff {diff:g})")


def weights(model: torch.nn.Module) -> list[np.ndarray]:
    """The model's parameters in construction order (names differ between the two implementations)."""
    return [p.detach().numpy().copy() for p in model.parameters()]


def main() -> int:
    ref = load_reference()
    torch.set_num_threads(1)  # the workers' setting; the same thread count on both sides in any case
    checks: list[tuple[str, Callable[[], None]]] = []

    def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
        def register(fn: Callable[[], None]) -> Callable[[], None]:
            checks.append((name, fn))
            return fn

        return register

    @check("class means")
    def _means() -> None:
        same_arrays("class_means", [w1.class_means()], [ref.class_means()])

    @check("client data of clients 0, 1, 17, 500, 999")
    def _clients() -> None:
        for k in (0, 1, 17, 500, 999):
            same_arrays(f"client_data({k})", list(w1.client_data(k)), list(ref.client_data(k)))

    @check("test data")
    def _test() -> None:
        same_arrays("test_data", list(w1.test_data()), list(ref.test_data()))

    @check("sampler, rounds 1..20, 100 and 10 clients")
    def _sampler() -> None:
        for r in range(1, 21):
            for n in (100, 10):
                ours, theirs = w1.sample_clients(r, n), ref.sample_clients(r, n)
                if ours != theirs:
                    raise Mismatch(f"sample_clients({r}, {n}): {ours[:5]}... vs {theirs[:5]}...")
                via = w1.sampler(r, np.arange(1000), n, np.random.default_rng(123))
                if via != theirs:
                    raise Mismatch(f"sampler({r}, ..., {n}) differs from the reference")

    for kind, size in (("mlp", 199_210), ("cnn", 582_026)):

        @check(f"initial {kind} weights ({size:,} parameters)")
        def _init(kind: str = kind, size: int = size) -> None:
            ours = w1.initial_model(kind)
            n = sum(p.numel() for p in ours.parameters())
            if n != size:
                raise Mismatch(f"{kind}: {n} parameters, expected {size}")
            same_arrays(f"initial_model({kind!r})", weights(ours), weights(ref.initial_model(kind)))

        @check(f"{kind} weights and loss after local_train of a client")
        def _train(kind: str = kind) -> None:
            epochs, rnd = (1, 3) if kind == "mlp" else (2, 2)
            k = w1.sample_clients(rnd, 10)[0]
            ours, theirs = w1.initial_model(kind), ref.initial_model(kind)
            x, y = w1.client_data(k)
            loss_ours = w1.local_train(ours, x, y, epochs, rnd, k)
            xr, yr = ref.client_data(k)
            loss_ref = ref.local_train(theirs, xr, yr, epochs, rnd, k)
            same_arrays(f"local_train({kind}, client {k}, round {rnd}, {epochs} epochs)",
                        weights(ours), weights(theirs))
            if loss_ours != loss_ref:
                raise Mismatch(f"local_train loss {loss_ours!r} vs reference {loss_ref!r}")
            xt, yt = w1.test_data()
            if w1.evaluate(ours, xt, yt) != ref.evaluate(theirs, xt, yt):
                raise Mismatch("evaluate() differs")

    failed = 0
    for name, fn in checks:
        try:
            fn()
        except Mismatch as e:
            print(f"MISMATCH {name}: {e}", flush=True)
            failed += 1
        else:
            print(f"OK {name}", flush=True)
    print("all checks passed" if not failed else f"{failed} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
