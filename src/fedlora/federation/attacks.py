"""Hostile clients for robustness studies: a :class:`HostileRuntime` wraps any runtime and rewrites the replies of
chosen clients with one of :data:`ATTACKS` after they trained honestly.

The attacks are the ones a server must survive: broken values (NaN/Inf tensors or counts, wrong types), and
valid-looking poison (an update scaled ×100, a sign-flipped update, an absurd example count). They act on the
reply as it travels, so they assume the ``none`` upload codec (the payload is the state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from fedlora.adapters.state import AdapterState
from fedlora.federation.round import Runtime
from fedlora.methods.base import ClientPlan, ClientUpdate, ServerState

Attack = Callable[[ClientUpdate, ClientPlan], object]


def _scaled(update: ClientUpdate, plan: ClientPlan, factor: float) -> ClientUpdate:
    """The reply with its update (state − download; state where nothing was sent) multiplied by ``factor``."""
    state = {}
    for k, v in update.state.items():
        ref = plan.download.get(k)
        if ref is None or ref.shape != v.shape:
            state[k] = v * factor
        else:
            state[k] = ref + (v - ref) * factor
    return dataclasses.replace(update, state=state)


ATTACKS: dict[str, Attack] = {
    "nan_values": lambda u, p: dataclasses.replace(
        u, state={k: torch.full_like(v, float("nan")) for k, v in u.state.items()}
    ),
    "inf_values": lambda u, p: dataclasses.replace(
        u, state={k: torch.full_like(v, float("inf")) for k, v in u.state.items()}
    ),
    "nan_count": lambda u, p: dataclasses.replace(u, num_examples=float("nan")),
    "inf_count": lambda u, p: dataclasses.replace(u, num_examples=float("inf"), samples_seen=float("inf")),
    "wrong_types": lambda u, p: dataclasses.replace(u, state={k: v.tolist() for k, v in u.state.items()}),
    "huge_norm": lambda u, p: _scaled(u, p, 100.0),
    "sign_flip": lambda u, p: _scaled(u, p, -1.0),
    "absurd_count": lambda u, p: dataclasses.replace(u, num_examples=10**12, samples_seen=10**12),
}
"""Name → how a hostile client rewrites its honest reply."""


class HostileRuntime:
    """A runtime whose clients ``hostile`` answer with ``attack`` (every other call goes to ``inner``).

    ``attack="drop"`` makes them send nothing usable (the baseline a robust server should match)."""

    def __init__(self, inner: Runtime, hostile: Sequence[int], attack: str) -> None:
        if attack != "drop" and attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; allowed: drop, {', '.join(ATTACKS)}")
        self.inner = inner
        self.hostile = set(hostile)
        self.attack = attack

    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        replies = self.inner.train(plans)
        out: list = []
        for plan, reply in zip(plans, replies, strict=True):
            if plan.client_id in self.hostile and isinstance(reply, ClientUpdate):
                reply = RuntimeError("dropped") if self.attack == "drop" else ATTACKS[self.attack](reply, plan)
            out.append(reply)
        return out

    def accept(self, client_ids: Sequence[int]) -> None:
        self.inner.accept(client_ids)

    def evaluate(self, server: ServerState) -> dict[str, float]:
        return self.inner.evaluate(server)

    def client_states(self) -> dict[int, AdapterState]:
        return self.inner.client_states()

    def base_weights(self) -> dict[str, torch.Tensor]:
        return self.inner.base_weights()

    def restore(
        self, server: ServerState, clients: Mapping[int, AdapterState], weights: Mapping[str, torch.Tensor]
    ) -> None:
        self.inner.restore(server, clients, weights)
