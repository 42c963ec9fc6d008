"""Simulated devices: compute speed, bandwidths and availability per client, assigned from the seed.

A client's simulated duration in a round is ``download_bytes / down_bps + samples / speed +
upload_bytes / up_bps`` (the real byte counts, after compression). Availability is a periodic list of
on-intervals (FedScale's behaviour traces): a client is online at virtual time ``t`` when
``t mod period`` falls inside one of them.

Sources: log-normal spreads (:meth:`DevicePopulation.lognormal`), a CSV or JSON trace
(:meth:`DevicePopulation.from_trace`), or FedScale's device capacity and behaviour traces
(:meth:`DevicePopulation.from_fedscale`).

Example:
    >>> import numpy as np
    >>> from flgraph.sim import DevicePopulation
    >>> pop = DevicePopulation.lognormal(np.arange(1000), seed=0, speed=200.0, speed_sigma=1.0)
    >>> p = pop.profile(7)
    >>> round(p.duration(samples=64, down_bytes=8e5, up_bytes=8e5), 3) == round(
    ...     8e5 / p.down_bps + 64 / p.speed + 8e5 / p.up_bps, 3)
    True
    >>> pop.spread() > 10   # fastest / slowest compute speed
    True
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, DataError
from ..rng import stream

__all__ = ["DevicePopulation", "DeviceProfile"]

_TAG = 0x5E71CE  # the devices' stream tag: (tag, client) -> that client's draws


@dataclass(frozen=True)
class DeviceProfile:
    """One device: ``speed`` samples/s of training, ``down_bps``/``up_bps`` bytes/s, availability.

    ``on`` lists ``(start, end)`` seconds within each ``period``; ``on=None`` means always online.
    """

    speed: float
    down_bps: float
    up_bps: float
    on: tuple[tuple[float, float], ...] | None = None
    period: float = math.inf

    def duration(self, samples: float, down_bytes: float, up_bytes: float) -> float:
        """Simulated seconds to download, train on ``samples`` samples, and upload."""
        return down_bytes / self.down_bps + samples / self.speed + up_bytes / self.up_bps

    def online(self, t: float) -> bool:
        """Whether the device is online at virtual time ``t``."""
        if self.on is None:
            return True
        x = t % self.period if math.isfinite(self.period) else t
        return any(a <= x < b for a, b in self.on)

    def online_until(self, t: float) -> float:
        """When the device goes offline, if it is online at ``t`` (``t`` itself if it is offline)."""
        if self.on is None:
            return math.inf
        base = (t // self.period) * self.period if math.isfinite(self.period) else 0.0
        x = t - base
        for a, b in self.on:
            if a <= x < b:
                return base + b
        return t


class DevicePopulation:
    """Device profiles for a set of client ids (deterministic from the seed or read from a trace)."""

    def __init__(self, profiles: Mapping[int, DeviceProfile], *,
                 source: tuple[str, dict[str, Any]] | None = None) -> None:
        if not profiles:
            raise ConfigError("a device population needs at least one profile")
        for cid, p in (profiles.items() if isinstance(profiles, dict) else ()):  # lazy ones are valid by make
            if not (p.speed > 0 and p.down_bps > 0 and p.up_bps > 0):
                raise ConfigError(f"client {cid}'s device has a non-positive speed or bandwidth: {p}",
                                  fix="speeds and bandwidths must be > 0")
        self.profiles = profiles
        self._source = source

    def flgraph_spec(self) -> tuple[str | None, dict[str, Any]]:
        """How to make this population again (for checkpoints): a factory's import path and arguments,
        or ``(None, {})`` for profiles given directly."""
        return self._source if self._source is not None else (None, {})

    def profile(self, client: int) -> DeviceProfile:
        try:
            return self.profiles[int(client)]
        except KeyError:
            raise DataError(f"client {client} has no device profile ({len(self.profiles)} profiles)",
                            fix="give every client of the dataset a profile") from None

    def __len__(self) -> int:
        return len(self.profiles)

    def online_mask(self, ids: Any, t: float) -> Any:
        """Whether each client of ``ids`` is online at virtual time ``t`` (a bool array)."""
        lazy = self.profiles
        if (isinstance(lazy, _LognormalProfiles) and isinstance(lazy.ids, range)
                and None in (lazy.settings["mean_on"], lazy.settings["mean_off"])):
            arr = np.asarray(ids, np.int64)
            if not len(arr) or (arr.min() >= lazy.ids.start and arr.max() < lazy.ids.stop):
                return np.ones(len(arr), bool)  # always online: no profile needs making
        return np.fromiter((self.profile(int(c)).online(t) for c in ids), bool, len(ids))

    def spread(self) -> float:
        """Fastest over slowest compute speed."""
        speeds = [p.speed for p in self.profiles.values()]
        return max(speeds) / min(speeds)

    # -- sources ---------------------------------------------------------------------------------------
    @classmethod
    def lognormal(cls, client_ids: Iterable[int] | int, *, seed: int, speed: float = 100.0, speed_sigma: float = 0.8,
                  down_bps: float = 2.5e6, down_sigma: float = 0.6, up_bps: float = 1.0e6, up_sigma: float = 0.6,
                  mean_on: float | None = None, mean_off: float | None = None,
                  period: float = 86400.0) -> DevicePopulation:
        """Log-normal speeds (median ``speed`` samples/s) and bandwidths (medians in bytes/s), per client.

        With ``mean_on``/``mean_off`` (seconds), each device alternates exponential on/off periods within a
        repeating ``period``; otherwise devices are always online. Client ``k``'s draws come from the stream
        ``(seed, devices, k)``, so a client's device does not depend on which other clients exist.
        """
        ids: range | np.ndarray
        if isinstance(client_ids, (int, range)):
            ids = range(client_ids) if isinstance(client_ids, int) else client_ids
        else:
            ids = np.unique(np.fromiter((int(k) for k in client_ids), np.int64))
            if len(ids) and ids[0] == 0 and ids[-1] == len(ids) - 1:
                ids = range(len(ids))
        source_ids: int | list[int] = (len(ids) if isinstance(ids, range) and ids == range(len(ids))
                                       else [int(k) for k in ids])
        kwargs = {"client_ids": source_ids, "seed": seed, "speed": speed, "speed_sigma": speed_sigma,
                  "down_bps": down_bps, "down_sigma": down_sigma, "up_bps": up_bps, "up_sigma": up_sigma,
                  "mean_on": mean_on, "mean_off": mean_off, "period": period}
        settings = {k: v for k, v in kwargs.items() if k != "client_ids"}
        if not (speed > 0 and down_bps > 0 and up_bps > 0):
            raise ConfigError(f"DevicePopulation.lognormal: medians must be > 0 (speed={speed}, down_bps={down_bps}, "
                              f"up_bps={up_bps})")
        out = _LognormalProfiles(ids, settings)
        return cls(out, source=("flgraph.sim.devices:DevicePopulation.lognormal", kwargs))

    @classmethod
    def from_trace(cls, path: str | Path) -> DevicePopulation:
        """Read a CSV or JSON trace.

        CSV columns: ``client, speed, down_bps, up_bps`` and optionally ``on`` (``"0-3600;7200-9000"``) and
        ``period``. JSON: a list of objects with the same keys (``on`` as a list of ``[start, end]``).
        """
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise DataError(f"cannot read the device trace {p}: {e}") from e
        rows: list[dict[str, Any]]
        if p.suffix.lower() == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} is not valid JSON: {e}") from e
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        out = {}
        for i, r in enumerate(rows):
            try:
                on_raw = r.get("on")
                on: tuple[tuple[float, float], ...] | None
                if on_raw in (None, "", []):
                    on = None
                elif isinstance(on_raw, str):
                    on = tuple((float(a), float(b)) for a, b in (x.split("-") for x in on_raw.split(";")))
                else:
                    on = tuple((float(a), float(b)) for a, b in on_raw)
                period = float(r.get("period") or (math.inf if on is None else 86400.0))
                out[int(r["client"])] = DeviceProfile(float(r["speed"]), float(r["down_bps"]), float(r["up_bps"]),
                                                      on, period)
            except (KeyError, ValueError, TypeError) as e:
                raise DataError(f"{p}, entry {i + 1}: {type(e).__name__}: {e}",
                                fix="each entry needs client, speed, down_bps, up_bps (and optionally on, period)"
                                ) from e
        return cls(out, source=("flgraph.sim.devices:DevicePopulation.from_trace", {"path": str(p.resolve())}))

    @classmethod
    def from_fedscale(cls, capacity: str | Path, behaviour: str | Path | None = None, *,
                      client_ids: Iterable[int] | None = None, batch_factor: float = 3.0) -> DevicePopulation:
        """FedScale's traces: ``client_device_capacity`` (``{id: {'computation': ms per sample of inference,
        'communication': kbit/s}}``) and optionally ``client_behave_trace`` (``{id: {'active': [s],
        'inactive': [s], 'finish_time': s, ...}}``), both pickled dicts.

        FedScale counts a training sample as ``batch_factor`` (3) inferences. Trace entries are assigned
        to ``client_ids`` in order (FedScale's own mapping), cycling if there are fewer entries. The files
        are read with an unpickler that accepts only plain dicts, lists and numbers.
        """
        caps = _safe_pickle(Path(capacity))
        behave = _safe_pickle(Path(behaviour)) if behaviour is not None else None
        keys = sorted(caps)
        if not keys:
            raise DataError(f"{capacity} holds no device entries")
        ids = list(client_ids) if client_ids is not None else list(range(len(keys)))
        bkeys = sorted(behave) if behave else []
        out = {}
        for i, cid in enumerate(ids):
            c = caps[keys[i % len(keys)]]
            try:
                ms = float(c["computation"])
                kbps = float(c["communication"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{capacity}: entry {keys[i % len(keys)]!r} lacks computation/communication") from e
            bps = kbps * 1000.0 / 8.0
            on, period = None, math.inf
            if behave:
                b = behave[bkeys[i % len(bkeys)]]
                active, inactive = list(b.get("active", [])), list(b.get("inactive", []))
                period = float(b.get("finish_time", 0)) or math.inf
                on = tuple((float(a), float(z)) for a, z in zip(active, inactive)) or None
            out[int(cid)] = DeviceProfile(1000.0 / (batch_factor * ms), bps, bps, on, period)
        return cls(out, source=("flgraph.sim.devices:DevicePopulation.from_fedscale", {
            "capacity": str(Path(capacity).resolve()),
            "behaviour": str(Path(behaviour).resolve()) if behaviour is not None else None,
            "client_ids": [int(c) for c in ids], "batch_factor": batch_factor}))


def _lognormal_profile(k: int, seed: int, speed: float, speed_sigma: float, down_bps: float, down_sigma: float,
                       up_bps: float, up_sigma: float, mean_on: float | None, mean_off: float | None,
                       period: float) -> DeviceProfile:
    """Client ``k``'s device, from its own stream ``(seed, devices, k)``."""
    g = stream(seed, _TAG, int(k))
    s, d, u = g.standard_normal(3)
    on: tuple[tuple[float, float], ...] | None = None
    if mean_on is not None and mean_off is not None:
        intervals: list[tuple[float, float]] = []
        t = float(g.uniform(0, mean_off))
        while t < period and len(intervals) < 10_000:
            length = float(g.exponential(mean_on))
            intervals.append((t, min(t + length, period)))
            t += length + float(g.exponential(mean_off))
        on = tuple(intervals)
    return DeviceProfile(speed * math.exp(speed_sigma * s), down_bps * math.exp(down_sigma * d),
                         up_bps * math.exp(up_sigma * u), on, period if on is not None else math.inf)


class _LognormalProfiles(Mapping[int, DeviceProfile]):
    """Log-normal profiles made on demand from each client's stream: O(1) memory for a ``range`` of ids
    (a million devices cost nothing until drawn), the same profiles as making them all up front."""

    def __init__(self, ids: range | np.ndarray, settings: dict[str, Any]) -> None:
        self.ids, self.settings = ids, settings

    def __getitem__(self, client: int) -> DeviceProfile:
        if client not in self:
            raise KeyError(client)
        return _lognormal_profile(int(client), **self.settings)

    def __contains__(self, client: object) -> bool:
        if not isinstance(client, (int, np.integer)):
            return False
        if isinstance(self.ids, range):
            return int(client) in self.ids
        at = int(np.searchsorted(self.ids, client))
        return at < len(self.ids) and int(self.ids[at]) == int(client)

    def __iter__(self) -> Iterator[int]:
        return (int(k) for k in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a trace file can hold no code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        ("builtins", n) for n in ("dict", "list", "tuple", "set", "int", "float", "str", "bool"))

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the trace refers to {module}.{name}; only plain data is accepted")


def _safe_pickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            data = _PlainUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read the FedScale trace {path}: {e}",
                        fix="pass FedScale's client_device_capacity / client_behave_trace files") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not FedScale's dict of clients")
    return data

