"""Client work: start from the plan's adapter, train the planned tensors with a plain torch loop, reply.

The same function serves every engine: the local engine calls it with its one shared model, a Flower
``ClientApp`` with the model it holds. Only tensors in ``plan.train_keys`` get gradients; a fresh optimiser is
built every round (as in every reference implementation: Adam moments are reset each round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.adapters.peft_io import AdapterSlots
from fedlora.adapters.state import AdapterState
from fedlora.methods.base import ClientPlan, ClientUpdate, FedMethod, derive_seed
from fedlora.tasks.base import Encoded, Task


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; allowed: adamw, sgd")


def train_local(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    task: Task,
    data: Encoded,
    settings: TrainSettings,
    *,
    seed: int,
    pad_id: int,
) -> dict[str, float]:
    """Train ``params`` on ``data``; shuffling and dropout are drawn from ``seed``. Returns loss and counts."""
    if len(data) == 0:
        raise ValueError("a client has no training examples")
    model.train()
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(params, settings)
    steps, seen, loss_sum = 0, 0, 0.0
    budget = settings.steps
    epochs = settings.epochs if budget is None else None
    epoch = 0
    while (budget is None and epoch < (epochs or 0)) or (budget is not None and steps < budget):
        for index in task.batch_indices(len(data), settings.batch_size, gen):
            batch = task.collate(data, index, pad_id)
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            steps += 1
            seen += len(index)
            loss_sum += loss.item() * len(index)
            if budget is not None and steps >= budget:
                break
        epoch += 1
    return {"train_loss": loss_sum / max(seen, 1), "steps": steps, "samples_seen": seen}


def client_round(
    method: FedMethod,
    plan: ClientPlan,
    *,
    slots: AdapterSlots,
    initial: AdapterState,
    personal: AdapterState | None,
    task: Task,
    data: Encoded,
    settings: TrainSettings,
    run_seed: int,
    pad_id: int,
) -> tuple[ClientUpdate, AdapterState | None]:
    """One client's turn: returns its reply and the personal state it keeps (or None)."""
    slots.load(method.start_state(plan, initial, personal))
    params = slots.set_trainable(plan.train_keys)
    stats = train_local(
        slots.model,
        params,
        task,
        data,
        settings,
        seed=derive_seed(run_seed, "train", plan.round, plan.client_id),
        pad_id=pad_id,
    )
    upload, keep = method.finish(plan, slots.read())
    update = ClientUpdate(
        client_id=plan.client_id,
        state=upload,
        num_examples=len(data),
        samples_seen=int(stats["samples_seen"]),
        metrics=stats,
    )
    return update, keep
