"""Fuzz the edge message decoder with at least a million inputs: no crash, no hang, every rejection a
ProtocolError with a known code.

    .venv/bin/python bench/zmq_fuzz.py [--inputs 1000000] [--atheris SECONDS]

Inputs: random frames, valid messages with random byte mutations, truncations and extra frames, and
msgpack maps with random values in every field. With --atheris (if installed) a coverage-guided run follows.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
from flgraph.transports.zmq import Limits, ProtocolError, decode, encode

CODES = {"malformed", "too-large", "version", "unknown-type", "bad-field", "bad-tensor"}
LIMITS = Limits(max_tensor_bytes=1 << 20)


def seeds() -> list[list[bytes]]:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    spec = [["w", [8, 8], "float32"]]
    out = [
        encode("join", 1, {"client": 3, "agent": "a", "caps": {"codecs": "raw,lz4"}, "device": {"cpus": 4}}),
        encode("accept", 1, {"session": "ab", "client": 3, "heartbeat_s": 1.0, "liveness": 3,
                             "max_tensor_bytes": 1 << 20}),
        encode("task", 2, {"round": 1, "task": 9, "client": 3, "deadline_s": 5.0, "seed": 0, "config": {"lr": 0.1},
                           "spec": spec}, [x], compress="raw"),
        encode("result", 3, {"round": 1, "task": 9, "num_samples": 8, "kind": "delta", "metrics": {"loss": 1.0}},
               [np.zeros(4096, np.float32)], compress="lz4"),
        encode("error", 4, {"code": "x", "text": "y", "round": 1}),
        encode("heartbeat", 5, {}),
        encode("reconnect-later", 6, {"retry_s": 1.0, "reason": "full"}),
        encode("task", 7, {"round": 1, "task": 9, "client": 3, "deadline_s": 5.0, "seed": 0, "config": {},
                           "spec": spec, "mode": "evaluate", "stages": [
                               {"class": "flgraph.stages.train:LocalTrain", "tag": 5,
                                "settings": {"lr": 0.1, "freeze": ["head"], "optimizer": {
                                    "class": "flgraph.stages.train:SGD", "settings": {"lr": 0.1, "momentum": 0.9}}}}]},
               [x], compress="raw"),
        encode("part", 8, {"xfer": 1, "index": 0, "count": 2, "total": 512}, [np.zeros(256, np.uint8)]),
    ]
    return [[bytes(f) for f in m] for m in out]


VALUES = [None, True, 0, -1, 2**63, 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x" * 2000, b"\x00",
          [], [1, [2, [3]]], {}, {"a": 1}, {"a": float("nan")}, [["w", [2], "float32"]], [["w", [-1], "f"]]]
FIELDS = ["v", "t", "seq", "client", "round", "task", "config", "spec", "metrics", "code", "text", "session",
          "kind", "num_samples", "tensors", "heartbeat_s", "retry_s"]


def generate(rng: random.Random, base: list[list[bytes]]) -> list[bytes]:
    kind = rng.randrange(5)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(0, 7))]
    msg = [bytearray(f) for f in rng.choice(base)]
    if kind == 1:  # byte mutations
        for _ in range(rng.randrange(1, 8)):
            f = rng.choice(msg)
            if f:
                f[rng.randrange(len(f))] = rng.randrange(256)
    elif kind == 2:  # truncation / extension / frame shuffling
        i = rng.randrange(len(msg))
        msg[i] = msg[i][: rng.randrange(len(msg[i]) + 1)] + bytearray(rng.randbytes(rng.randrange(0, 4)))
        if rng.random() < 0.3:
            msg.append(bytearray(rng.randbytes(rng.randrange(0, 64))))
        if rng.random() < 0.2:
            rng.shuffle(msg)
    else:  # a valid envelope with random field values
        env = msgpack.unpackb(bytes(msg[0]))
        for _ in range(rng.randrange(1, 4)):
            env[rng.choice(FIELDS)] = rng.choice(VALUES)
        descs = env.get("tensors")
        if kind == 4 and isinstance(descs, list) and descs and isinstance(descs[0], list) and len(descs[0]) == 4:
            d = list(descs[0])
            d[rng.randrange(4)] = rng.choice([*VALUES, "float64", "lz4", [1 << 30], 10**9])
            env["tensors"] = [d]
        msg[0] = bytearray(msgpack.packb(env))
    return [bytes(f) for f in msg]


def run(n: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    base = seeds()
    counts: dict[str, int] = {"ok": 0}
    worst = 0.0
    for _ in range(n):
        frames = generate(rng, base)
        t0 = time.perf_counter()
        try:
            decode(frames, LIMITS)
            counts["ok"] += 1
        except ProtocolError as e:
            if e.code not in CODES:
                raise AssertionError(f"unexpected code {e.code}: {e}") from None
            counts[e.code] = counts.get(e.code, 0) + 1
        worst = max(worst, time.perf_counter() - t0)
    counts["worst_us"] = int(worst * 1e6)
    return counts


def atheris_run(seconds: float) -> None:
    import types

    import atheris  # optional
    from flgraph.transports.zmq import wire

    # Coverage guidance for the decoder only: instrument the wire module's own functions (decode calls its
    # helpers through the module's globals, so swapping them in place instruments the whole path).
    # instrument_all() would also instrument torch, numpy and dask: minutes of start-up for no signal.
    for name, obj in list(vars(wire).items()):
        if isinstance(obj, types.FunctionType) and obj.__module__ == wire.__name__:
            setattr(wire, name, atheris.instrument_func(obj))

    # An input is a msgpack list of frames (so libFuzzer can start from, and mutate, real messages: the
    # seed corpus is every message type, validly encoded); bytes that are not such a list are one frame.
    def frames_of(data: bytes) -> list[bytes]:
        try:
            got = msgpack.unpackb(data, raw=True, max_array_len=8, max_bin_len=1 << 16)
        except Exception:
            return [data]
        if isinstance(got, list) and all(isinstance(f, bytes) for f in got):
            return got
        return [data]

    def one(data: bytes) -> None:
        try:
            wire.decode(frames_of(data), LIMITS)
        except ProtocolError as e:
            assert e.code in CODES

    corpus = tempfile.mkdtemp(prefix="flgraph-fuzz-corpus-")
    for i, msg in enumerate(seeds()):
        Path(corpus, f"seed-{i}").write_bytes(msgpack.packb(msg, use_bin_type=True))
    # libFuzzer stops itself after max_total_time and exits the process (so this must run last); a crash or
    # a failed assertion is written under the temporary artifact folder and reported with its input.
    artifacts = tempfile.mkdtemp(prefix="flgraph-fuzz-")
    print(f"atheris: {seconds:.0f} s of coverage-guided fuzzing of the wire decoder (artifacts: {artifacts})",
          flush=True)
    atheris.Setup([sys.argv[0], f"-max_total_time={max(1, int(seconds))}", "-rss_limit_mb=2048",
                   "-print_final_stats=1", "-max_len=70000", f"-artifact_prefix={artifacts}/", corpus], one)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atheris", type=float, default=0.0, help="seconds of coverage-guided fuzzing afterwards")
    args = ap.parse_args()
    t0 = time.perf_counter()
    counts = run(args.inputs, args.seed)
    dt = time.perf_counter() - t0
    print(f"decoder fuzz: {args.inputs:,} inputs in {dt:.1f} s ({args.inputs / dt:,.0f}/s); no crash, no hang; "
          f"slowest input {counts.pop('worst_us')} us")
    print("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if args.atheris:
        atheris_run(args.atheris)


if __name__ == "__main__":
    main()
