"""Differentially private FedAvg (McMahan et al., ICLR 2018): clip each client's update, add Gaussian noise
calibrated to the clip norm, once on the sum (central DP) or on each update before it leaves the client
(local DP); adaptive clipping (Andrew et al., NeurIPS 2021) in :mod:`flgraph.stages.clipping`.

* :class:`ClipUpdate` (client stage) scales the update to L2 norm at most ``C``, the last client stage
  before the upload. With ``clip=None`` ``C`` is the adaptive clip norm broadcast by
  :class:`~flgraph.stages.AdaptiveClip`, and the client also writes ``clip_bit`` (1 when its update's norm
  was at most ``C``). With ``noise_multiplier=z`` it adds ``N(0, (z C)^2)`` to the clipped update itself
  (local DP; the noise key is the client's own, drawn on the client and kept in its per-client state).
* :class:`DPAggregate` (reduce stage) sums the clipped updates, adds ``N(0, (z C)^2)`` once to the sum and
  divides by the round's *expected* number of clients (the actual count is itself private under Poisson
  sampling), then steps the model.
* :class:`~flgraph.stages.PrivacyAccountant` (:mod:`flgraph.stages.accounting`) reads the sampling of
  ``Select`` and the noise of these stages from the pipeline and reports ``epsilon``.

The noise comes from a secret key (:mod:`flgraph.stages.dp_noise`): never from the run seed.

:class:`ClipNorm` is the reducer wrapper that clips each delta at the reducer's leaf (norm clipping for
robustness, e.g. in FedBuff); it adds no noise.

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.ClipUpdate(clip=1.0).writes()), sorted(st.ClipUpdate().reads())
    (['update'], ['on-clients:clip_norm', 'update'])
    >>> st.DPAggregate(noise_multiplier=1.1)
    DPAggregate(noise_multiplier=1.1, server_lr=1.0)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from flgraph.context import ClientWork, RoundContext, Update
from flgraph.errors import ConfigError, PipelineError
from flgraph.graph import ClientStage, Reducer, ReduceStage, Stage
from flgraph.params import Params, ParamSpec

from .aggregate import Mean, WeightedMean
from .dp_noise import fresh_key, gaussian, insecure_key, key_array, key_bytes, warn_insecure

__all__ = ["ClipNorm", "ClipUpdate", "DPAggregate", "DPSetup", "dp_setup"]


def _positive(name: str, v: float) -> float:
    if not isinstance(v, int | float) or not v > 0 or not math.isfinite(v):
        raise ConfigError(f"{name}={v!r}: must be a positive finite number")
    return float(v)


class ClipNorm(Reducer):
    """Scale each client delta to L2 norm at most ``max_norm``, then hand it to ``inner`` (no noise: for DP use
    :class:`ClipUpdate` and :class:`DPAggregate`)."""

    def __init__(self, inner: Reducer | None = None, *, max_norm: float = 1.0) -> None:
        _positive("ClipNorm(max_norm)", max_norm)
        inner = inner if inner is not None else WeightedMean()
        if not isinstance(inner, Reducer):
            raise ConfigError(f"ClipNorm(inner={inner!r}): inner must be a reducer, e.g. WeightedMean()")
        self.inner = inner
        self.max_norm = max_norm
        self.needs_all = inner.needs_all  # type: ignore[misc]

    def leaf(self, update: Update, spec: ParamSpec) -> Any:
        delta = update.decoded(spec)
        if update.delta is not delta:
            delta = np.array(delta, copy=True)
        norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
        if norm > self.max_norm:
            delta *= delta.dtype.type(self.max_norm / norm)
        update.delta, update.payload, update.codec = delta, None, None
        return self.inner.leaf(update, spec)

    def combine(self, left: Any, right: Any) -> Any:
        return self.inner.combine(left, right)

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        return self.inner.finalize(acc, spec)

    def settings(self) -> dict[str, Any]:
        return {"inner": self.inner, "max_norm": self.max_norm}

    def __repr__(self) -> str:
        return f"ClipNorm({self.inner!r}, max_norm={self.max_norm!r})"


class ClipUpdate(ClientStage):
    """Clip the client's update to L2 norm at most ``clip`` (``None``: the adaptive clip norm broadcast as
    ``clip_norm``, and the client reports ``clip_bit``); with ``noise_multiplier`` add local Gaussian noise
    ``N(0, (noise_multiplier * clip)^2)`` to the clipped update on the client (local DP).

    It must be the last client stage (nothing may change the update after it is clipped and noised).
    """

    def __init__(self, clip: float | None = None, *, noise_multiplier: float | None = None,
                 insecure_seed: int | None = None) -> None:
        if clip is not None:
            _positive("ClipUpdate(clip)", clip)
        if noise_multiplier is not None:
            _positive("ClipUpdate(noise_multiplier)", noise_multiplier)
            if clip is None:
                raise ConfigError("ClipUpdate(noise_multiplier=..., clip=None): local noise with an adaptive clip "
                                  "norm would need the clipped-count bit noised on every client too",
                                  fix="give a fixed clip= for local DP, or use central noise (DPAggregate)")
        if insecure_seed is not None:
            if noise_multiplier is None:
                raise ConfigError("ClipUpdate(insecure_seed=...) without noise_multiplier: there is no noise",
                                  fix="drop insecure_seed=")
            warn_insecure("ClipUpdate", insecure_seed)
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.insecure_seed = insecure_seed

    @property
    def adaptive(self) -> bool:
        return self.clip is None

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in super().settings().items() if v is not None}

    def reads(self) -> frozenset[str]:
        return frozenset({"update", "on-clients:clip_norm"} if self.adaptive else {"update"})

    def writes(self) -> frozenset[str]:
        return frozenset({"update", "clip_bit"} if self.adaptive else {"update"})

    def client_fields(self, spec: ParamSpec) -> dict[str, tuple[str, int]]:
        # local DP: each client's own noise key, drawn on the client the first time, kept with its state
        return {"noise_key": ("<u8", 4)} if self.noise_multiplier is not None else {}

    def run(self, work: ClientWork) -> None:
        upd = work.update
        if upd is None:
            raise ConfigError("ClipUpdate found no update to clip", fix="put it after LocalTrain(...)")
        if work.round == 0:
            return  # the transport's warm-up update: it is thrown away, and no clip norm is broadcast for it
        if self.adaptive:
            if np.asarray(work.values.get("clip_norm", ())).size != 1:
                raise ConfigError("ClipUpdate() (adaptive) needs the clip norm on the clients",
                                  fix="broadcast it: st.Broadcast('params', 'clip_norm')")
            clip = float(np.asarray(work.values["clip_norm"]).reshape(-1)[0])
        else:
            assert self.clip is not None
            clip = self.clip
        spec = work.global_params.spec
        delta = np.array(upd.decoded(spec), dtype=np.float64)
        norm = float(np.linalg.norm(delta))
        if norm > clip:
            delta *= clip / norm
        if self.noise_multiplier is not None:
            delta += self.noise_multiplier * clip * gaussian(self._client_key(work), "local", work.round, delta.size)
        upd.delta, upd.payload, upd.codec = delta.astype(spec.carrier), None, None
        if self.adaptive:
            bit = np.array([1.0 if norm <= clip else 0.0], spec.carrier)
            work.outputs["clip_bit"] = Update(work.client, 1, work.round - 1, bit)

    def _client_key(self, work: ClientWork) -> bytes:
        saved = work.load_state("noise_key")
        if saved is not None:
            return np.asarray(saved, "<u8").tobytes()
        if self.insecure_seed is not None:
            key = insecure_key(self.insecure_seed * 1_000_003 + work.client)
        else:
            key = fresh_key()
        work.save_state("noise_key", np.frombuffer(key, "<u8").copy())
        return key


class DPSetup:
    """What the pipeline's DP stages add up to, read from the stages themselves (one copy of each setting).

    ``mode``: ``"central"`` (noise on the sum, :class:`DPAggregate`) or ``"local"`` (noise on each update,
    :class:`ClipUpdate`). ``noise_multiplier`` is the effective multiplier of the whole release per unit of
    sensitivity under add/remove-one (for adaptive clipping: of the update and the clipped count together,
    Andrew et al. Sec. 3); ``update_noise`` the multiplier of the update's noise alone.
    """

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        from .clipping import AdaptiveClip
        from .select import Select

        selects = [s for s in stages if isinstance(s, Select)]
        clips = [s for s in stages if isinstance(s, ClipUpdate)]
        aggs = [s for s in stages if isinstance(s, DPAggregate)]
        adaptive = [s for s in stages if isinstance(s, AdaptiveClip)]
        if len(selects) != 1:
            raise PipelineError(f"differential privacy needs exactly one Select, the pipeline has {len(selects)}",
                                fix="one st.Select(...) per round")
        if len(clips) != 1:
            raise PipelineError("differential privacy needs one ClipUpdate, the last client stage",
                                fix="add st.ClipUpdate(clip=C) after LocalTrain(...)")
        client_stages = [s for s in stages if s.kind == "client"]
        if client_stages[-1] is not clips[0]:
            raise PipelineError(f"{type(client_stages[-1]).__name__} runs after ClipUpdate: it would change the "
                                "clipped (and noised) update", fix="make st.ClipUpdate(...) the last client stage")
        self.select: Select = selects[0]
        self.clip_stage: ClipUpdate = clips[0]
        self.aggregate: DPAggregate | None = aggs[0] if aggs else None
        self.adaptive: AdaptiveClip | None = adaptive[0] if adaptive else None
        local = self.clip_stage.noise_multiplier is not None
        if local == (self.aggregate is not None):
            raise PipelineError("add the noise once: on the clients (ClipUpdate(noise_multiplier=...), local DP) "
                                "or on the sum (DPAggregate(noise_multiplier=...), central DP)" if local else
                                "no stage adds noise", fix="st.DPAggregate(noise_multiplier=z) after "
                                "ClipUpdate(clip=C), or ClipUpdate(clip=C, noise_multiplier=z) >> "
                                "Aggregate(Mean())")
        if self.clip_stage.adaptive != (self.adaptive is not None):
            raise PipelineError("ClipUpdate() without clip= reads the adaptive clip norm, kept by AdaptiveClip"
                                if self.clip_stage.adaptive else "AdaptiveClip's clip norm is not used: "
                                "ClipUpdate has a fixed clip=", fix="ClipUpdate() with st.AdaptiveClip(...), "
                                "or ClipUpdate(clip=C) without it")
        self.mode = "local" if local else "central"
        if local and self.select.sampling == "poisson":
            raise ConfigError("local DP with Select(sampling='poisson'): the server sees who takes part, so "
                              "local noise gets no amplification by sampling and the sampling buys nothing",
                              fix="use Select(sampling='fixed') with local DP")
        multiplier = (self.clip_stage.noise_multiplier if local else
                      self.aggregate.noise_multiplier if self.aggregate is not None else None)
        assert multiplier is not None
        self.noise_multiplier = float(multiplier)
        self.population = 0
        self.expected = 0.0
        self.update_noise = self.noise_multiplier

    def size(self, population: int) -> None:
        """Settle what depends on the population: the expected clients per round and the noise split."""
        self.population = population
        self.expected = self.select.rate(population) * population
        if self.adaptive is not None:
            sigma_b = self.adaptive.count_noise_for(self.expected)
            z = self.noise_multiplier
            if not 2 * sigma_b > z:
                raise ConfigError(f"AdaptiveClip(count_noise={sigma_b:g}) with noise_multiplier={z:g}: the count's "
                                  "noise must satisfy 2 * count_noise > noise_multiplier (the split of Andrew et "
                                  "al. leaves the update the rest)", fix=f"count_noise > {z / 2:g}, e.g. the "
                                  "default expected_clients / 20 with more clients per round")
            self.update_noise = (z**-2 - (2 * sigma_b) ** -2) ** -0.5

    @property
    def insecure(self) -> bool:
        """Whether any noise of the pipeline comes from a public seed."""
        stages = [self.clip_stage, self.aggregate, self.adaptive]
        return any(getattr(s, "insecure_seed", None) is not None for s in stages)


def dp_setup(stages: tuple[Stage, ...]) -> DPSetup:
    """The :class:`DPSetup` of a pipeline's stages (raises PipelineError/ConfigError if it is not sound)."""
    return DPSetup(stages)


class DPAggregate(ReduceStage):
    """Central DP: sum the clipped updates, add ``N(0, (z C)^2)`` once, divide by the round's expected number
    of clients and step the model by ``server_lr`` times the result.

    ``z`` is ``noise_multiplier`` (with :class:`~flgraph.stages.AdaptiveClip`: the effective multiplier of the
    update and the clipped count together; the update gets ``(z^-2 - (2 sigma_b)^-2)^-1/2``). ``C`` is
    ``ClipUpdate``'s clip, or the round's adaptive clip norm. The noise key is drawn from the operating
    system when the run starts and kept in this stage's state (``noise_key``: secret; see
    :mod:`flgraph.stages.dp_noise`); ``insecure_seed=`` derives it from a public seed for tests, and warns.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(self, noise_multiplier: float = 1.0, *, server_lr: float = 1.0,
                 insecure_seed: int | None = None) -> None:
        _positive("DPAggregate(noise_multiplier)", noise_multiplier)
        _positive("DPAggregate(server_lr)", server_lr)
        if insecure_seed is not None:
            warn_insecure("DPAggregate", insecure_seed)
        self.noise_multiplier = noise_multiplier
        self.server_lr = server_lr
        self.insecure_seed = insecure_seed
        self.reducer: Reducer = Mean(dtype="float64")
        self._setup: DPSetup | None = None

    @property
    def name(self) -> str:
        return "dp-aggregate"

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"noise_multiplier": self.noise_multiplier, "server_lr": self.server_lr}
        if self.insecure_seed is not None:
            out["insecure_seed"] = self.insecure_seed  # in the spec: the run says it is not private
        return out

    def see_pipeline(self, stages: tuple[Stage, ...]) -> None:
        self._setup = dp_setup(stages)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        if self._setup is None:
            raise PipelineError("DPAggregate was not shown its pipeline", fix="run it inside flgraph.Run")
        self._setup.size(dataset.num_clients)

    def init_state(self, params: Params) -> dict[str, Any]:
        key = insecure_key(self.insecure_seed) if self.insecure_seed is not None else fresh_key()
        return {"noise_key": key_array(key)}

    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        setup = self._setup
        assert setup is not None, "prepare() runs first"
        if setup.adaptive is not None:
            clip = float(np.asarray(ctx.values["clip_norm"]).reshape(-1)[0])
        else:
            assert setup.clip_stage.clip is not None
            clip = setup.clip_stage.clip
        key = key_bytes(ctx.state["noise_key"])
        total = np.asarray(delta, np.float64) * weight  # the mean times the count: the sum of clipped updates
        noisy = total + (setup.update_noise * clip) * gaussian(key, "update", ctx.round, total.size)
        step = (self.server_lr / setup.expected) * noisy
        ctx.params = Params(ctx.params.spec, (ctx.params.flat + step).astype(ctx.params.spec.carrier))
        ctx.metrics["update_norm"] = float(np.linalg.norm(step))
        ctx.metrics["dp_clip"] = clip
