"""User-level differential privacy for federated rounds (DP-FedAvg; McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018, arXiv:1710.06963).

A client's *update* is what it uploads minus what it started from (:meth:`fedlora.methods.base.FedMethod.reference`:
the download, and the factors a re-initialising plan draws; zero for keys the server cannot know). It is clipped
to L2 norm ``C`` (``dp_clip``) jointly over every tensor the client uploads, and Gaussian noise of std ``σ·C``
(``σ`` = ``dp_noise``) per coordinate is added:

* ``noise_at="server"`` (trusted server): the server sums the clipped updates of the accepted replies, adds the
  noise once, and divides by a *fixed* denominator (fixed-size sampling: the ``m`` clients sampled per round;
  Poisson sampling: ``q·N``, the expected count), giving the noisy mean update ``D``. Every accepted client's reply
  is then replaced by ``reference + D`` before the method aggregates: whatever the method computes from identical
  replies is post-processing of one Gaussian release, so the guarantee holds for every method whose aggregate is an
  average of what travels from one shared starting point (:func:`server_noise_refusal` names the others). A round
  in which no reply is accepted (an empty Poisson sample, only failures) still releases ``reference + noise/den``.
* ``noise_at="client"`` (untrusted server): each client clips its own update and adds the noise before encoding its
  upload; the server aggregates as usual (every method), and what it computes is post-processing of noisy uploads.

The functions here are pure (tensors in, tensors out; randomness from an explicit ``torch.Generator``);
:mod:`fedlora.privacy.accounting` turns ``(σ, sampling, rounds, δ)`` into ε.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.methods.base import derive_seed

NOISE_AT = ("server", "client")
SAMPLINGS = ("fixed", "poisson")

AVERAGE_REFUSALS: dict[str, str] = {
    "fedex_lora": (
        "it folds the gap between the mean of the clients' products and the product of their mean factors into the "
        "frozen weights; handed one mean update in place of the clients' own, that gap is zero and it would run as "
        "fedit (use fedit)"
    ),
    "flora": (
        "each client starts from factors freshly drawn for it, and the server stacks every client's factors into "
        "the frozen weights, so there is no shared starting point and nothing to average"
    ),
    "flexlora": (
        "the server re-factorises the weighted sum of the clients' products by a truncated SVD at each client's "
        "rank, which is not an average of what travels"
    ),
    "hetlora": (
        "clients train (and prune to) different ranks and the server weights each by the norm of its own product"
    ),
    "pad_zero": "clients train at different ranks, averaged rank slot by rank slot over zero padding",
    "pad_replicate": "clients train at different ranks, averaged rank slot by rank slot over replicated padding",
    "fl_tac": (
        "each client starts from its own cluster's adapter and the server clusters the submissions, so there is no "
        "one shared starting point to average from, and the cluster assignments would reveal which clients took part"
    ),
    "scaffold": (
        "its server control variate moves by |S|/N times the mean change of the clients' control variates, which "
        "depends on the number of accepted replies |S|, not only on their average (under server-side DP, |S| would "
        "be released without noise)"
    ),
    "fedalt": (
        "each client uploads its own individual LoRA, which the server never sent (no shared starting point), and "
        "each client's Rest-of-World adapter is the average of the OTHER clients' uploads, which needs them one by one"
    ),
    "fslora": (
        "each client trains and uploads its own random sketch of the rank slots, which the server scatters back by "
        "index: clients start from different slices, so there is no one shared starting point to average from"
    ),
}
"""Why these methods' aggregate is not an average of what travels from one shared starting point (a method not
listed is refused too when it refuses robust aggregators or trains mixed ranks: :func:`average_refusal`). Server-side
noise and secure aggregation both need such an average."""


# ------------------------------------------------------------------------------------------------ updates
def reference_for(reference: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """What a client started from for ``key`` (cut to ``like``'s shape for a lower rank), float32; zeros when the
    server cannot know it (a key that was not sent, e.g. a control-variate change)."""
    ref = reference.get(key)
    if ref is None or ref.dim() != like.dim() or any(a < b for a, b in zip(ref.shape, like.shape, strict=True)):
        return torch.zeros_like(like, dtype=torch.float32)
    return ref[tuple(slice(0, n) for n in like.shape)].float()


def update_delta(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's update: each uploaded tensor minus what it started from (:func:`reference_for`), float32."""
    return {k: v.float() - reference_for(reference, k, v) for k, v in state.items()}


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of an update over all its tensors (float64 accumulation)."""
    return math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in delta.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled by ``min(1, clip / ||delta||)`` (its norm is then at most ``clip``), and its norm before."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip={clip!r} must be a finite number > 0")
    norm = update_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v.float() * factor for k, v in delta.items()}, norm


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent N(0, std²) per coordinate, one float32 tensor per key of ``like`` (drawn in sorted key order, so
    the draw does not depend on dict order)."""
    return {k: torch.randn(tuple(like[k].shape), generator=generator) * std for k in sorted(like)}


def noisy_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    like: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise: float,
    denominator: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``(Σ_k clip(Δ_k) + N(0, (noise·clip)²)) / denominator`` per coordinate over the keys and shapes of ``like``.

    ``denominator`` is fixed in advance (never the number of updates: that count depends on who took part, and
    dividing by it would change the sensitivity); updates may be empty (the release is then noise alone)."""
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(f"denominator={denominator!r} must be a finite number > 0")
    total = {k: torch.zeros(tuple(v.shape), dtype=torch.float32) for k, v in like.items()}
    for d in deltas:
        if set(d) != set(total) or any(tuple(d[k].shape) != tuple(total[k].shape) for k in total):
            raise ValueError("every update of a noisy mean must have the same keys and shapes")
        clipped, _ = clip_update(d, clip)
        for k in total:
            total[k] += clipped[k]
    if noise > 0:
        for k, z in gaussian_noise(total, noise * clip, generator).items():
            total[k] += z
    return {k: v / denominator for k, v in total.items()}


def privatize_upload(
    upload: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """A client's upload with its update clipped to ``clip`` and N(0, (noise·clip)²) added per coordinate:
    ``reference + clip(upload − reference) + noise`` in each tensor's own dtype (client-side noise)."""
    delta = update_delta(upload, reference)
    clipped, _ = clip_update(delta, clip)
    if noise > 0:
        for k, z in gaussian_noise(clipped, noise * clip, generator).items():
            clipped[k] = clipped[k] + z
    return {k: (reference_for(reference, k, v) + clipped[k]).to(v.dtype) for k, v in upload.items()}


# ------------------------------------------------------------------------------------------------ methods
def average_refusal(cls: Any) -> str | None:
    """Why method class ``cls``'s aggregate is not a weighted average of what travels from one starting point shared
    by every client, whatever the number of replies (None when it is).

    Two mechanisms hand the method one mean update in place of the clients' own and need exactly this: server-side
    DP noise (every accepted reply replaced by ``reference + D``, :func:`server_noise_refusal`) and secure
    aggregation on the Flower path (the server learns only the weighted mean, :mod:`fedlora.flower.secagg`)."""
    if cls.id in AVERAGE_REFUSALS:
        return AVERAGE_REFUSALS[cls.id]
    if not cls.supports_robust_aggregation:
        return (
            "its aggregate is not an average of what travels (" + (cls.robust_refusal or "it combines products") + ")"
        )
    if cls.supports_mixed_ranks:
        return "it trains clients at different ranks, whose updates have no common shape to average"
    return None


def averaging_methods() -> list[str]:
    """The registered methods whose aggregate is an average of what travels (:func:`average_refusal` is None)."""
    from fedlora.methods.base import get_method_class, method_ids

    return [m for m in method_ids() if average_refusal(get_method_class(m)) is None]


def server_noise_refusal(cls: Any) -> str | None:
    """Why method class ``cls`` cannot use server-side noise (None when it can).

    Server noise replaces every accepted reply by ``reference + D`` (one noisy mean update); that is private for any
    method whose aggregate is an average of what travels, from one starting point shared by all clients, and whose
    result does not depend on how many replies there were (:func:`average_refusal`)."""
    reason = average_refusal(cls)
    if reason is None:
        return None
    return (
        f"{cls.id} cannot use dp_noise_at='server': {reason}. Server-side DP hands every client's update, replaced "
        "by one noisy mean update, to the method, which is private only for methods that average what travels. "
        f"Use dp_noise_at='client' (each client noises its own update) or one of: {', '.join(averaging_methods())}"
    )


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class UserLevelDP:
    """User-level DP of a run: the mechanism (clip, noise, where it is added), the sampling the accountant needs,
    and the budget. One object serves the round logic (server noise), the client (client noise) and the run loop
    (ε per round, stop when a target would be exceeded)."""

    clip: float
    """``C``: the L2 bound of one client's update over all the tensors it uploads."""
    noise: float
    """``σ``: the noise std per coordinate is ``σ·C`` (0: clipping only, ε = ∞)."""
    num_clients: int
    sampling: str = "fixed"
    per_round: int | None = None
    """Fixed-size sampling: the clients sampled per round (None: all)."""
    rate: float | None = None
    """Poisson sampling: the probability ``q`` with which each client joins a round."""
    noise_at: str = "server"
    delta: float = 1e-5
    target_epsilon: float | None = None
    """Stop the run before a round that would raise ε (RDP) above it."""
    seed: int = 0
    secure_noise: bool = False
    """Draw noise from a generator seeded by the operating system's entropy, not from the run's seed."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp_clip={self.clip!r} must be a finite number > 0")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"dp_noise={self.noise!r} must be a finite number >= 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp_delta={self.delta!r} must be in (0, 1)")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"dp_target_epsilon={self.target_epsilon!r} must be a finite number > 0")
        if self.noise_at not in NOISE_AT:
            raise ValueError(f"dp_noise_at={self.noise_at!r}; allowed: {', '.join(NOISE_AT)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"client_sampling={self.sampling!r}; allowed: {', '.join(SAMPLINGS)}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients!r} must be >= 1")
        if self.sampling == "poisson" and (self.rate is None or not 0 < self.rate <= 1):
            raise ValueError(f"Poisson sampling needs client_fraction in (0, 1], got {self.rate!r}")
        if self.sampling == "fixed" and self.per_round is not None and not 1 <= self.per_round <= self.num_clients:
            raise ValueError(f"per_round={self.per_round!r} must be in 1..{self.num_clients}")

    @property
    def sample_size(self) -> int:
        """Fixed-size sampling: the clients per round."""
        return self.per_round if self.per_round is not None else self.num_clients

    @property
    def denominator(self) -> float:
        """The fixed denominator of the server's noisy mean: ``m`` (fixed-size sampling) or ``q·N`` (Poisson)."""
        if self.sampling == "poisson":
            assert self.rate is not None
            return self.rate * self.num_clients
        return float(self.sample_size)

    def generator(self, *parts: object) -> torch.Generator:
        """The generator of one noise draw (``parts``: purpose, round, client): seeded by the run seed, so a run is
        reproducible, or (``secure_noise``) by the operating system's entropy, so knowing the seed does not let
        anyone recompute and subtract the noise."""
        seed = secrets.randbits(63) if self.secure_noise else derive_seed(self.seed, "dp-noise", *parts)
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ accounting
    def epsilon(self, rounds: int, participations: int | None = None, *, accountant: str = "rdp") -> float | None:
        """ε after ``rounds`` rounds; with client noise, of a client that took part in ``participations`` of
        them (default: all). ``None`` when ``accountant`` does not support the sampling (PLD, fixed m < N)."""
        from fedlora.privacy.accounting import client_epsilon, server_epsilon

        if self.noise_at == "client":
            k = rounds if participations is None else participations
            return client_epsilon(self.noise, k, self.delta, accountant=accountant)
        return server_epsilon(
            self.noise,
            rounds,
            self.delta,
            sampling=self.sampling,
            num_clients=self.num_clients,
            per_round=self.sample_size,
            rate=self.rate,
            accountant=accountant,
        )

    def metrics(self, rounds: int, participations: int | None = None) -> dict[str, float | None]:
        """What goes into a round's line of ``metrics.jsonl``: ε (RDP and PLD) after ``rounds``, δ and σ."""
        return {
            "dp_epsilon": self.epsilon(rounds, participations),
            "dp_epsilon_pld": self.epsilon(rounds, participations, accountant="pld"),
            "dp_delta": self.delta,
            "dp_noise": self.noise,
        }

    def neighbours(self) -> str:
        """The neighbouring relation ε refers to (see :mod:`fedlora.privacy.accounting`)."""
        if self.noise_at == "client":
            return "replace-one (a client's data replaced by any other; the server sees who took part)"
        if self.sampling == "fixed" and self.sample_size < self.num_clients:
            return "replace-one (one client's data replaced by another's; N is public)"
        return "add-or-remove-one (one client's data present or absent)"
