"""Secure aggregation as stages (SecAgg+, Bell et al., CCS 2020; SecAgg, Bonawitz et al., CCS 2017): the
server learns only the sum of the clients' clipped, quantised updates.

One :class:`~flgraph.secure.SecAggConfig` drives three stages, one at each place of the round::

    Select(100) >> Broadcast() >> SecureSetup(cfg)     # AdvertiseKeys, ShareKeys (on the clients)
                >> LocalTrain(...) >> SecureMask(cfg)  # clip, quantise into Z_M, add the masks
                >> SecureAggregate(cfg)                # sum mod M, Unmasking, mean of the clipped updates

The masked inputs are summed mod ``M`` by the engine's reduction tree (:class:`SecureSum`): modular sums
do not depend on the order, so the round is bit-identical with 1 or N workers, though every key is fresh
OS randomness each round. The transport must declare ``"secure aggregation"``: Dask does (simulated
clients), and so does ``ZmqTransport``, whose agents run their clients' phases on the device
(``transports/PROTOCOL.md`` section 4.5); ``MixedTransport`` refuses such a round before it starts. See
:mod:`flgraph.secure` for the protocol.

Example:
    >>> import numpy as np
    >>> from flgraph.context import Update
    >>> from flgraph.params import ParamSpec
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(2, np.float32)})
    >>> r = SecureSum(2**8)
    >>> a = r.leaf(Update(4, 1, 0, np.array([200, 7], np.uint32)), spec)
    >>> b = r.leaf(Update(9, 1, 0, np.array([100, 9], np.uint32)), spec)
    >>> (total, ids), weight = r.finalize(r.combine(a, b), spec)
    >>> total.tolist(), ids, weight
    ([44, 16], [4, 9], 2.0)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from flgraph.context import ClientWork, RoundContext, Update
from flgraph.errors import ClientError, ConfigError, PipelineError
from flgraph.graph import ClientStage, Reducer, ServerStage
from flgraph.params import ParamSpec
from flgraph.rng import stream
from flgraph.secure import Dropouts, SecAggConfig, SecureRound
from flgraph.secure import protocol as secagg
from flgraph.secure.client import masked_input
from flgraph.secure.masks import add_mod, dequantise_sum, field_dtype, quantise

from .aggregate import Aggregate

__all__ = ["SecureAggregate", "SecureMask", "SecureSetup", "SecureSum"]

FEATURE = "secure aggregation"


def _config(config: Any, where: str) -> SecAggConfig:
    if not isinstance(config, SecAggConfig):
        raise ConfigError(f"{where}: expected a SecAggConfig, got {type(config).__name__}",
                          fix="cfg = flgraph.secure.SecAggConfig(neighbours=..., clip=...); pass the same cfg "
                              "to SecureSetup, SecureMask and SecureAggregate")
    return config


class SecureSetup(ServerStage):
    """AdvertiseKeys and ShareKeys on the round's clients, before they train; the clients that go on to
    mask their input replace the round's clients. ``dropouts`` (:class:`~flgraph.secure.Dropouts`) makes
    clients drop at chosen phases, for tests and studies.

    Example:
        >>> from flgraph.secure import SecAggConfig
        >>> sorted(SecureSetup(SecAggConfig()).writes())
        ['clients', 'secure-keys']
    """

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})
    provides: ClassVar[frozenset[str]] = frozenset({"clients", "secure-keys"})
    feature: ClassVar[str | None] = FEATURE

    def __init__(self, config: SecAggConfig, *, dropouts: Dropouts | None = None) -> None:
        self.config = _config(config, "SecureSetup")
        if dropouts is not None and not isinstance(dropouts, Dropouts):
            raise ConfigError(f"SecureSetup(dropouts={dropouts!r})", fix="pass flgraph.secure.Dropouts(...)")
        self.dropouts = dropouts

    def run(self, ctx: RoundContext) -> None:
        if ctx.clients is None:
            raise PipelineError("SecureSetup runs before any clients were chosen", fix="put st.Select(...) first")
        ctx.values["secure-keys"] = secagg.start(ctx, self.config, self.dropouts)


class SecureMask(ClientStage):
    """On the client, after training: clip each coordinate of the update to ``[-clip, clip]``, quantise it
    onto ``levels`` integers (unbiased stochastic rounding from the client's seeded stream), add the self
    mask and the pairwise masks mod ``M``. The update then holds the masked input (``uint32`` when ``M <=
    2**32`` a power of two, else ``uint64``) and nothing else.

    Example:
        >>> from flgraph.secure import SecAggConfig
        >>> sorted(SecureMask(SecAggConfig()).reads())
        ['secure-keys', 'update']
    """

    requires: ClassVar[frozenset[str]] = frozenset({"update", "secure-keys"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})
    feature: ClassVar[str | None] = FEATURE

    def __init__(self, config: SecAggConfig) -> None:
        self.config = _config(config, "SecureMask")

    def run(self, work: ClientWork) -> None:
        record = work.setting("secagg", None)
        update = work.update
        cfg = self.config
        if record is None and update is not None and work.round == 0:
            # round 0 is a transport's warm-up client (its update is thrown away, never aggregated): give it
            # the quantised form, so the warm-up loads what a round needs, with no key and no mask
            update.delta = quantise(update.decoded(work.global_params.spec), cfg.clip, cfg.levels,
                                    stream(work.seed, work.tag, 0, work.client)).astype(self._carrier())
            return
        if record is None or update is None:
            raise ClientError("no SecureSetup prepared this client's masks" if record is None else "no update",
                              client=work.client, stage="SecureMask", round=work.round,
                              fix="compose Select >> Broadcast >> SecureSetup(cfg) >> LocalTrain >> SecureMask(cfg)")
        if record.config != cfg:
            raise ClientError(f"SecureMask({cfg!r}) and SecureSetup({record.config!r}) disagree", client=work.client,
                              stage="SecureMask", round=work.round,
                              fix="pass the same SecAggConfig to SecureSetup, SecureMask and SecureAggregate")
        delta = update.decoded(work.global_params.spec)
        x = quantise(delta, cfg.clip, cfg.levels, stream(work.seed, work.tag, work.round, work.client))
        y = masked_input(record, x, cfg.modulus)
        raw = int(delta.nbytes)
        update.delta = y.astype(self._carrier(), copy=False)
        update.payload, update.codec, update.raw_nbytes = None, None, raw


    def _carrier(self) -> np.dtype[Any]:
        """The masked input's dtype: the field's (4 bytes an element for ``M`` a power of two up to ``2**32``)."""
        return field_dtype(self.config.modulus)


class SecureSum(Reducer):
    """The sum of masked inputs mod ``modulus``, with the ids of the clients in it (the survivors); its
    ``finalize`` gives ``((masked sum, client ids), count)``, which :class:`SecureAggregate` unmasks."""

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus

    def __repr__(self) -> str:
        return f"SecureSum(modulus={self.modulus})"

    def leaf(self, update: Update, spec: ParamSpec) -> tuple[np.ndarray, list[int]]:
        y = update.delta
        if y is None or y.dtype.kind != "u":
            raise ClientError("the update reached SecureSum unmasked", client=update.client, stage="SecureSum",
                              round=update.base_round + 1, fix="put SecureMask(cfg) after the client's training")
        update.delta = None
        return y.astype(field_dtype(self.modulus), copy=False), [int(update.client)]

    def combine(self, left: Any, right: Any) -> Any:
        add_mod(left[0], right[0], self.modulus)
        left[1].extend(right[1])
        return left

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        return (acc[0], sorted(acc[1])), float(len(acc[1]))


class SecureAggregate(Aggregate):
    """Unmasking, then the model step: the server reconstructs the masks that do not cancel from the
    survivors' shares, gets the sum of the quantised updates, and steps the params by ``server_lr`` times
    the mean of the clipped updates. The round's record (who dropped when, bytes and seconds of each phase,
    the unmasked integer sum) is :attr:`last_round`.

    Example:
        >>> from flgraph.secure import SecAggConfig
        >>> SecureAggregate(SecAggConfig(clip=0.5)).reducer
        SecureSum(modulus=4294967296)
    """

    any_value: ClassVar[bool] = False
    feature: ClassVar[str | None] = FEATURE

    def __init__(self, config: SecAggConfig, *, server_lr: float = 1.0) -> None:
        self.config = _config(config, "SecureAggregate")
        super().__init__(SecureSum(self.config.modulus), server_lr=server_lr)
        self._last: SecureRound | None = None

    def settings(self) -> dict[str, Any]:
        return {"config": self.config, "server_lr": self.server_lr}  # the reducer follows from the config

    @property
    def last_round(self) -> SecureRound | None:
        """The last unmasked round's record (in the driver)."""
        return self._last

    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        session = ctx.values.get("secure-keys")
        if not isinstance(session, secagg.Session):
            raise PipelineError("SecureAggregate found no SecureSetup in the round",
                                fix="put st.SecureSetup(cfg) after Select and before the client stages")
        if session.config != self.config:
            raise PipelineError(f"SecureAggregate({self.config!r}) and SecureSetup({session.config!r}) disagree",
                                fix="pass the same SecAggConfig to SecureSetup, SecureMask and SecureAggregate")
        masked, contributors = delta
        total = secagg.finish(ctx, session, masked, contributors)
        cfg, n = self.config, len(contributors)
        mean = (dequantise_sum(total, n, cfg.clip, cfg.levels) / n).astype(ctx.params.flat.dtype)
        report = session.report
        self._last = report
        ctx.metrics["secagg_survivors"] = n
        ctx.metrics["secagg_bytes_up"] = sum(report.bytes_up.values())
        ctx.metrics["secagg_bytes_down"] = sum(report.bytes_down.values())
        for phase, seconds in report.seconds.items():
            ctx.metrics[f"time_secagg_{phase}"] = seconds
        super().apply(ctx, mean, float(n))
