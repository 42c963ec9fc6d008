"""DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018) with adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021)::

    each round r:  stop if the round would spend more than max_epsilon   -> PrivacyAccountant (first)
                   S <- each client with probability q (Poisson)          -> Select(sampling="poisson")
                   send x (and the clip norm C) to S                      -> Broadcast("params", "clip_norm")
                   on client i:  d_i <- local SGD from x, minus x         -> LocalTrain
                                 d_i <- d_i min(1, C / |d_i|);  b_i <- [|d_i| <= C]   -> ClipUpdate()
                   x <- x + lr_g (sum d_i + N(0, z_d^2 C^2)) / (q N)     -> DPAggregate(z)
                   C <- C exp(-eta_C ((sum(b_i - 1/2) + N(0, s_b^2)) / (q N) + 1/2 - gamma))   -> AdaptiveClip

``noise_multiplier`` ``z`` is the effective multiplier the accountant uses; with adaptive clipping the
update gets ``z_d = (z^-2 - (2 s_b)^-2)^-1/2`` and the count ``s_b = qN / 20`` (the paper's split).
``adaptive=False`` clips at the fixed ``clip``; ``local=True`` adds the noise on each client instead (fixed
clip, fixed-size sampling). The noise keys are secret (drawn from the operating system, kept in the
checkpoint); ``insecure_seed=`` makes the noise reproducible for tests and says loudly that the run is not
private. The unit of privacy is the client; ``epsilon`` is reported at ``target_delta`` every round.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.dp_fedavg(fraction=0.1, noise_multiplier=1.0, clip=0.5, target_delta=1e-5)
    >>> print(repr(p).splitlines()[3])
      [reduce] update: dp-aggregate; clip_bit: aggregate
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.graph import Pipeline

__all__ = ["dp_fedavg"]


def dp_fedavg(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    noise_multiplier: float = 1.0,
    clip: float = 0.1,
    adaptive: bool = True,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    target_delta: float = 1e-5,
    max_epsilon: float | None = None,
    sampling: str = "poisson",
    local: bool = False,
    accountant: str = "rdp",
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    server_lr: float = 1.0,
    evaluate_every: int | None = 1,
    insecure_seed: int | None = None,
    **train: Any,
) -> Pipeline:
    """The DP-FedAvg round with its accountant.

    ``clients`` (expected count under Poisson sampling) or ``fraction`` (``q``; default 0.1); ``clip``: the
    fixed clip norm, or the first one with ``adaptive=True``; ``target_quantile`` and ``clip_lr``: Andrew et
    al.'s ``gamma`` and ``eta_C``; ``accountant``: ``"rdp"`` or ``"pld"``. Extra keywords go to
    :class:`~flgraph.stages.LocalTrain`.
    """
    if clients is None and fraction is None:
        fraction = 0.1
    if local and adaptive:
        raise ConfigError("dp_fedavg(local=True, adaptive=True): local DP clips at a fixed norm",
                          fix="dp_fedavg(local=True, adaptive=False, clip=C)")
    if local and sampling == "poisson":
        sampling = "fixed"  # the server sees who takes part: local noise gains nothing from Poisson sampling
    select = st.Select(clients, fraction=fraction, sampling=sampling)
    train_stage = st.LocalTrain(epochs, batch_size=batch_size, lr=lr, **train)
    p = st.PrivacyAccountant(target_delta, max_epsilon=max_epsilon, method=accountant) >> select
    if adaptive:
        p = (p >> st.Broadcast("params", "clip_norm") >> train_stage >> st.ClipUpdate()
             >> {"update": st.DPAggregate(noise_multiplier, server_lr=server_lr, insecure_seed=insecure_seed),
                 "clip_bit": st.Aggregate(st.Mean())}
             >> st.AdaptiveClip(clip, target_quantile=target_quantile, lr=clip_lr, insecure_seed=insecure_seed))
    elif local:
        p = (p >> st.Broadcast() >> train_stage
             >> st.ClipUpdate(clip, noise_multiplier=noise_multiplier, insecure_seed=insecure_seed)
             >> st.Aggregate(st.Mean(), server_lr=server_lr))
    else:
        p = (p >> st.Broadcast() >> train_stage >> st.ClipUpdate(clip)
             >> st.DPAggregate(noise_multiplier, server_lr=server_lr, insecure_seed=insecure_seed))
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
