"""Sample-level DP-SGD: how many noisy steps each client ran, and the ε they cost it (dp-accounting, RDP).

With ``dp_sgd_noise`` set, a client's local training (:func:`fedlora.client.train.train_local`) is DP-SGD: every
step draws a Poisson sample of its ``n`` training examples with rate ``q = min(1, B/n)`` (``B`` = batch size),
clips each example's gradient of the trainable tensors to norm ``C`` (``dp_sgd_clip``), sums, adds Gaussian noise
of standard deviation ``σ·C`` (``σ`` = ``dp_sgd_noise``) and divides by the expected batch size. One step is a
Poisson-sampled Gaussian mechanism on the client's data; all steps of all its rounds compose, so after ``T`` steps
the client's ε at ``δ`` is that of ``T`` compositions, computed by dp-accounting's RDP accountant.

*Steps are what the server knows, not what a client counted.* ``T`` for client ``k`` after round ``t`` is the sum,
over the rounds ``r < t`` in which the (seeded) schedule sampled it, of the steps its plan made it run there:
``stages × local steps`` (``local_steps``, or ``local_epochs × ⌈n/B⌉``: an epoch of Poisson batches), a straggler's
share of them, and for a client that failed mid-round the steps it ran before failing (counted although it sent
nothing: conservative). Every term is a function of the run configuration (schedule, failure policy, plans,
split sizes), so a resumed run reports the same ε as an uninterrupted one, without a counter to checkpoint.
A rejected reply still counts (it was released). :class:`DpSgdLedger` keeps this arithmetic;
:class:`AccountedRuntime` puts each client's ε into its reply's metrics (``dp_sgd_epsilon``) and the worst
client's so far into the round's (``dp_sgd_epsilon_max``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, ServerState


def sample_rate(batch_size: int, examples: int) -> float:
    """Poisson sampling rate of one DP-SGD step: ``min(1, batch_size / examples)``."""
    if batch_size < 1 or examples < 1:
        raise ValueError(f"batch_size={batch_size} and examples={examples} must be positive")
    return min(1.0, batch_size / examples)


def pass_steps(examples: int, batch_size: int, *, epochs: int, steps: int | None) -> int:
    """Steps of one full local pass: ``steps``, or ``epochs × ⌈examples / batch_size⌉``."""
    if steps is not None:
        return int(steps)
    return int(epochs) * math.ceil(examples / batch_size)


def _share(full: int, work: float) -> int:
    """Steps of a client doing ``work`` (0..1] of ``full`` steps (at least one), as the client loop rounds them."""
    return full if work >= 1.0 else max(1, math.ceil(work * full))


def round_steps(
    examples: int,
    *,
    batch_size: int,
    epochs: int,
    steps: int | None,
    stages: int = 1,
    work: float = 1.0,
    fail_after: float | None = None,
) -> int:
    """Local DP-SGD steps a client with ``examples`` training examples runs in one round: ``stages`` passes of
    ``work`` of its local steps, or, when it fails after ``fail_after`` of them, the steps of its first stage up to
    there (what :func:`fedlora.client.train.client_round` runs)."""
    full = pass_steps(examples, batch_size, epochs=epochs, steps=steps)
    if fail_after is not None:
        return _share(full, fail_after * work)
    return int(stages) * _share(full, work)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting warns (through absl) about each fractional RDP order whose series it cannot sum and then leaves
    that order out; the result is the same with or without the warning, so it is silenced here."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=65536)
def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` after ``steps`` Poisson-sampled Gaussian steps (noise multiplier ``noise``, rate
    ``sample_rate``): dp-accounting's ``RdpAccountant`` with its default orders. 0 for no step; ∞ for no noise."""
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise={noise!r} must be a finite number >= 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    if steps == 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet_absl():
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(event, steps)
        return float(accountant.get_epsilon(delta))


class DpSgdLedger:
    """Each client's DP-SGD steps and ε after any number of rounds, derived from the run's deterministic schedule.

    ``sampled(r)`` gives the clients of round ``r`` (0-based) and ``steps_in_round(r, k)`` the steps client ``k``
    ran in it (:func:`round_steps` of its plan); ``examples[k]`` is its training-set size. Nothing here is counted
    as clients train: the numbers are recomputed from these functions (and cached), so they survive a resume.
    """

    def __init__(
        self,
        *,
        noise: float,
        delta: float,
        batch_size: int,
        examples: Sequence[int],
        sampled: Callable[[int], Sequence[int]],
        steps_in_round: Callable[[int, int], int],
    ) -> None:
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"dp_sgd_noise={noise!r} must be a finite number > 0")
        if not 0 < delta < 1:
            raise ValueError(f"dp_sgd_delta={delta!r} must be in (0, 1)")
        self.noise = float(noise)
        self.delta = float(delta)
        self.batch_size = int(batch_size)
        self.examples = [int(n) for n in examples]
        self._sampled = sampled
        self._steps_in_round = steps_in_round
        self._totals: list[dict[int, int]] = [{}]
        """``_totals[t]``: steps of every client that trained in rounds ``0 .. t-1``."""

    def _after(self, rounds: int) -> dict[int, int]:
        if rounds < 0:
            raise ValueError(f"rounds={rounds} must be >= 0")
        while len(self._totals) <= rounds:
            r = len(self._totals) - 1
            totals = dict(self._totals[-1])
            for k in self._sampled(r):
                totals[k] = totals.get(k, 0) + int(self._steps_in_round(r, k))
            self._totals.append(totals)
        return self._totals[rounds]

    def steps(self, client: int, rounds: int) -> int:
        """DP-SGD steps client ``client`` ran in rounds ``0 .. rounds-1``."""
        return self._after(rounds).get(client, 0)

    def sample_rate(self, client: int) -> float:
        return sample_rate(self.batch_size, self.examples[client])

    def epsilon(self, client: int, rounds: int) -> float:
        """Client ``client``'s ε at ``delta`` after ``rounds`` rounds."""
        return epsilon(self.noise, self.sample_rate(client), self.steps(client, rounds), self.delta)

    def epsilon_max(self, rounds: int) -> float:
        """The largest client ε after ``rounds`` rounds (0 before any client trained). ε grows with the rate and
        the steps, so only the most steps per distinct rate are evaluated."""
        most: dict[float, int] = {}
        for k, t in self._after(rounds).items():
            q = self.sample_rate(k)
            most[q] = max(most.get(q, 0), t)
        return max((epsilon(self.noise, q, t, self.delta) for q, t in most.items()), default=0.0)


def run_ledger(
    cfg: Any, method: Any, initial: Mapping[str, torch.Tensor], examples: Sequence[int], schedule: Any, policy: Any
) -> DpSgdLedger:
    """The ledger of a run: ``cfg`` (a :class:`fedlora.config.RunConfig` with ``dp_sgd_noise`` set), its method,
    the initial adapter, each client's training-set size, its :class:`fedlora.federation.Schedule` and
    :class:`fedlora.federation.RoundPolicy` (whose seeded failures make stragglers and dropped clients). A round's
    number of stages is read from the plan the method makes for it (on the initial server state: methods vary
    their stages with the round only)."""
    start = method.init_server(dict(initial))

    def steps_in_round(rnd: int, client: int) -> int:
        work, fail_after = policy.failure(rnd, client)
        return round_steps(
            examples[client],
            batch_size=cfg.batch_size,
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
            stages=len(method.plan(rnd, client, start).stages),
            work=work,
            fail_after=fail_after,
        )

    return DpSgdLedger(
        noise=cfg.dp_sgd_noise,
        delta=cfg.dp_sgd_delta,
        batch_size=cfg.batch_size,
        examples=examples,
        sampled=schedule.clients,
        steps_in_round=steps_in_round,
    )


class AccountedRuntime:
    """A :class:`fedlora.federation.round.Runtime` that reports DP-SGD ε: each reply's metrics get the client's ε
    after this round (``dp_sgd_epsilon``, the server's number, replacing any the client sent) and each round's
    metrics the worst client's ε so far (``dp_sgd_epsilon_max``). Everything else is the wrapped runtime's."""

    def __init__(self, runtime: Any, ledger: DpSgdLedger) -> None:
        self.runtime = runtime
        self.ledger = ledger

    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        replies = self.runtime.train(plans)
        if len(replies) != len(plans):
            return replies  # the round logic refuses the mismatch
        out: list[ClientUpdate | Exception] = []
        for plan, reply in zip(plans, replies, strict=True):
            if type(reply) is ClientUpdate and isinstance(reply.metrics, Mapping):
                eps = self.ledger.epsilon(plan.client_id, plan.round + 1)
                with contextlib.suppress(Exception):  # odd metrics stay as they are; validation judges them
                    reply = replace(reply, metrics={**reply.metrics, "dp_sgd_epsilon": eps})
            out.append(reply)
        return out

    def accept(self, client_ids: Sequence[int]) -> None:
        self.runtime.accept(client_ids)

    def evaluate(self, server: ServerState) -> dict[str, float]:
        return {**self.runtime.evaluate(server), "dp_sgd_epsilon_max": self.ledger.epsilon_max(server.round)}

    def client_states(self) -> dict[int, Any]:
        return self.runtime.client_states()

    def base_weights(self) -> dict[str, torch.Tensor]:
        return self.runtime.base_weights()

    def restore(self, server: ServerState, clients: Mapping[int, Any], weights: Mapping[str, torch.Tensor]) -> None:
        self.runtime.restore(server, clients, weights)
