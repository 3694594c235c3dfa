"""The local (in-process) engine: every simulated client shares ONE frozen base model.

A client's turn is "copy its adapter tensors into the peft model in place (zero-padded to the global rank, with
its own scales), train, read them out" (:func:`fedlora.client.train.client_round`), so per-client memory is only
the state a method keeps per client, never a model. Changes of the frozen weights arrive inside plans (and in the
server state for evaluation); the shared base applies each once, which is what every client would hold.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.peft_io import AdapterSlots, add_to_base, base_weights
from fedlora.adapters.state import AdapterState, LoraLayout
from fedlora.client.train import ClientDropped, TrainSettings, client_round
from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, FedMethod, ServerState
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
        self.slots = AdapterSlots(model, ("default", *method.extra_adapters))
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
        self.base_version = 0

    # ------------------------------------------------------------------ base weights
    def _apply_base(self, update: BaseUpdate | None) -> None:
        if update is None or update.version <= self.base_version:
            return  # the shared base already holds it (another client of this round brought it)
        if update.cumulative:
            raise RuntimeError("the shared base missed a change of the base weights; it cannot rebuild the original")
        if update.version != self.base_version + 1:
            raise RuntimeError(f"base update to version {update.version} on a base at version {self.base_version}")
        add_to_base(self.model, self.layout, update.deltas)
        self.base_version = update.version

    def _sync_base(self, server: ServerState) -> None:
        if server.base_version > self.base_version:
            self._apply_base(BaseUpdate(server.base_version, server.last_base_update))

    # ------------------------------------------------------------------ Runtime
    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        replies: list[ClientUpdate | Exception] = []
        for plan in plans:
            try:
                self._apply_base(plan.base_update)
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
            except ClientDropped as e:  # a simulated failure: no traceback
                log.info("round %d: %s", plan.round + 1, e)
                replies.append(e)
                continue
            except Exception as e:  # a failing client is rejected by the round logic, the round goes on
                log.exception("client %d failed in round %d", plan.client_id, plan.round + 1)
                replies.append(e)
                continue
            if keep is not None:
                self._pending[plan.client_id] = keep
            replies.append(update)
            if self.on_client_done is not None:
                self.on_client_done(update)
        return replies

    def accept(self, client_ids: Sequence[int]) -> None:
        """Keep the state of accepted clients only; a rejected client keeps what it had."""
        for cid in client_ids:
            if cid in self._pending:
                self.personal[cid] = self._pending[cid]
        self._pending.clear()

    def take_pending(self, client_id: int) -> AdapterState | None:
        """What ``client_id``'s last turn computed for it to keep, handed over (and forgotten here) before the
        server decided: a runtime that keeps client state elsewhere (a Flower node) commits it itself."""
        return self._pending.pop(client_id, None)

    def hold(self, client_id: int, kept: AdapterState | None) -> None:
        """Make the engine hold only ``client_id``'s kept state (a Flower node serves one client at a time)."""
        self.personal = {client_id: kept} if kept is not None else {}
        self._pending.clear()

    def client_states(self) -> dict[int, AdapterState]:
        return dict(self.personal)

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in base_weights(self.model, self.layout).items()}

    def restore(
        self, server: ServerState, clients: Mapping[int, AdapterState], weights: Mapping[str, torch.Tensor]
    ) -> None:
        self.personal = {int(k): dict(v) for k, v in clients.items()}
        live = base_weights(self.model, self.layout)
        with torch.no_grad():
            for name, w in weights.items():
                live[name].copy_(w)
        self.base_version = server.base_version

    def evaluate(self, server: ServerState) -> dict[str, float]:
        metrics = self.evaluate_global(server)
        if self.method.has_personal_state:
            metrics.update(self.evaluate_personal(server))
        return metrics

    def evaluate_global(self, server: ServerState) -> dict[str, float]:
        """The task's metrics (e.g. accuracy and loss) of the global model on the global test split, each as
        ``global_<metric>`` (nothing for methods without a global model)."""
        self._sync_base(server)
        if not self.method.has_global_model:
            return {}
        self.slots.load(server.adapter)
        self.slots.reset_scales()
        m = self.task.evaluate(self.model, self.global_test, self.eval_batch_size, self.pad_id)
        return {f"global_{k}": float(v) for k, v in m.items() if k != "examples"}

    # ------------------------------------------------------------------ helpers
    def model_plan(self, client_id: int, server: ServerState) -> ClientPlan:
        """The plan that gives client ``client_id``'s own model now (what it would receive; no fresh factors)."""
        return dataclasses.replace(self.method.plan(server.round, client_id, server), reinit_seed=None)

    def load_client_model(self, client_id: int, server: ServerState, plan: ClientPlan | None = None) -> None:
        """Put client ``client_id``'s own model into the shared one (its ranks, scales and adapter mix): what
        ``plan`` (default: :meth:`model_plan`) sends it joined with what it keeps."""
        plan = plan or self.model_plan(client_id, server)
        state = self.method.start_state(plan, self.initial, self.personal.get(client_id))
        self.slots.load(self.initial)  # clears rank padding and adapters the client does not hold
        self.slots.load({k: v for k, v in state.items() if k in self.slots.params})
        self.slots.set_scales({k: v.scale for k, v in plan.ranks.items()}, self.method.inference_weights(client_id))

    def evaluate_client(self, client_id: int, server: ServerState, plan: ClientPlan | None = None) -> dict[str, float]:
        """The task's metrics (e.g. accuracy, loss) and the test-split size (``examples``) of client ``client_id``'s
        own model on its own test split."""
        splits = self.clients[client_id]
        if len(splits.test) == 0:
            return {"examples": 0}
        try:
            self.load_client_model(client_id, server, plan)
            m = self.task.evaluate(self.model, splits.test, self.eval_batch_size, self.pad_id)
        finally:
            self.slots.reset_scales()
        return {**{k: float(v) for k, v in m.items() if k != "examples"}, "examples": len(splits.test)}

    def evaluate_personal(self, server: ServerState) -> dict[str, float]:
        """The task's metrics of each client's own model on its own test split, weighted by split size."""
        return weighted_personal([self.evaluate_client(cid, server) for cid in range(len(self.clients))])


def weighted_personal(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``personal_<metric>`` (e.g. personal_accuracy, personal_loss): the clients' own results weighted by their
    test-split sizes (``examples``); a client without test examples does not count."""
    counted = [r for r in results if int(r["examples"]) > 0]
    total = sum(int(r["examples"]) for r in counted)
    if total == 0:
        return {}
    names = sorted({k for r in counted for k in r if k != "examples"})
    return {
        f"personal_{name}": sum(r[name] * r["examples"] for r in counted if name in r)
        / sum(int(r["examples"]) for r in counted if name in r)
        for name in names
    }
