"""The local (in-process) engine: every simulated client shares ONE frozen base model.

A client's turn is "copy its adapter tensors into the peft model in place, train, read them out"
(:func:`fedlora.client.train.client_round`), so per-client memory is only adapters (and personal tensors for
methods that keep them), never a model. Changes of the frozen weights (FedEx-LoRA, FLoRA) are applied once to
the shared base, which is what every client would hold after receiving them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.peft_io import AdapterSlots, add_to_base
from fedlora.adapters.state import AdapterState, LoraLayout
from fedlora.client.train import TrainSettings, client_round
from fedlora.methods.base import ClientPlan, ClientUpdate, FedMethod, ServerState
from fedlora.tasks.base import Encoded, Task

log = logging.getLogger("fedlora")


@dataclass(frozen=True)
class ClientSplits:
    train: Encoded
    test: Encoded


class LocalEngine:
    """A :class:`fedlora.federation.round.Runtime` that trains clients one after another in this process."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        layout: LoraLayout,
        method: FedMethod,
        task: Task,
        clients: Sequence[ClientSplits],
        global_test: Encoded,
        settings: TrainSettings,
        seed: int,
        pad_id: int,
        eval_batch_size: int = 128,
        on_client_done: Callable[[ClientUpdate], None] | None = None,
    ) -> None:
        self.model = model
        self.slots = AdapterSlots(model)
        self.layout = layout
        self.method = method
        self.task = task
        self.clients = list(clients)
        self.global_test = global_test
        self.settings = settings
        self.seed = seed
        self.pad_id = pad_id
        self.eval_batch_size = eval_batch_size
        self.on_client_done = on_client_done
        self.initial: AdapterState = self.slots.read()
        self.personal: dict[int, AdapterState] = {}
        self._pending: dict[int, AdapterState] = {}

    # ------------------------------------------------------------------ Runtime
    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        replies: list[ClientUpdate | Exception] = []
        for plan in plans:
            try:
                update, keep = client_round(
                    self.method,
                    plan,
                    slots=self.slots,
                    initial=self.initial,
                    personal=self.personal.get(plan.client_id),
                    task=self.task,
                    data=self.clients[plan.client_id].train,
                    settings=self.settings,
                    run_seed=self.seed,
                    pad_id=self.pad_id,
                )
            except Exception as e:  # a failing client is rejected by the round logic, the round goes on
                log.exception("client %d failed in round %d", plan.client_id, plan.round)
                replies.append(e)
                continue
            if keep is not None:
                self._pending[plan.client_id] = keep
            replies.append(update)
            if self.on_client_done is not None:
                self.on_client_done(update)
        return replies

    def accept(self, client_ids: Sequence[int]) -> None:
        """Keep the personal state of accepted clients only; a rejected client keeps what it had."""
        for cid in client_ids:
            if cid in self._pending:
                self.personal[cid] = self._pending[cid]
        self._pending.clear()

    def apply_base_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        add_to_base(self.model, self.layout, delta)

    def evaluate(self, server: ServerState) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.method.has_global_model:
            self.slots.load(server.adapter)
            m = self.task.evaluate(self.model, self.global_test, self.eval_batch_size, self.pad_id)
            metrics["global_accuracy"] = m["accuracy"]
            metrics["global_loss"] = m["loss"]
        if self.method.has_personal_state:
            metrics.update(self.evaluate_personal(server))
        return metrics

    # ------------------------------------------------------------------ helpers
    def client_model_state(self, client_id: int, server: ServerState) -> AdapterState:
        """The adapter client ``client_id`` would use now: what it would receive ∪ what it keeps."""
        plan = dataclasses.replace(self.method.plan(server.round, client_id, server), reinit_seed=None)
        return self.method.start_state(plan, self.initial, self.personal.get(client_id))

    def evaluate_personal(self, server: ServerState) -> dict[str, float]:
        """Accuracy and loss of each client's own model on its own test split, weighted by split size."""
        total, acc, loss = 0, 0.0, 0.0
        for cid, splits in enumerate(self.clients):
            if len(splits.test) == 0:
                continue
            self.slots.load(self.client_model_state(cid, server))
            m = self.task.evaluate(self.model, splits.test, self.eval_batch_size, self.pad_id)
            n = len(splits.test)
            total += n
            acc += m["accuracy"] * n
            loss += m["loss"] * n
        if total == 0:
            return {}
        return {"personal_accuracy": acc / total, "personal_loss": loss / total}
