"""Client work: start from the plan's adapter, train the planned tensors with a plain torch loop, reply.

The same function serves every engine: the local engine calls it with its one shared model, a Flower
``ClientApp`` with the model it holds. The loop is written once; a method shapes it only through what its plan
and objective declare (stages and trainable sets, extra loss terms, gradient corrections). A fresh optimiser is
built for every stage of every round (as in every reference implementation: Adam moments are reset each round).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedlora.adapters.peft_io import AdapterSlots
from fedlora.adapters.state import LORA_A_SUFFIX, AdapterState
from fedlora.client.codecs import encode_state, parse_codec
from fedlora.client.objectives import Objective
from fedlora.methods.base import ClientPlan, ClientUpdate, FedMethod, ModuleRank, TrainStats, derive_seed
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


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], TrainSettings], torch.optim.Optimizer]] = {
    "adamw": lambda p, s: torch.optim.AdamW(p, lr=s.lr, weight_decay=s.weight_decay),
    "sgd": lambda p, s: torch.optim.SGD(p, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay),
}


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {s.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[s.optimizer](params, s)


def train_local(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    task: Task,
    data: Encoded,
    settings: TrainSettings,
    *,
    seed: int,
    pad_id: int,
    objective: Objective | None = None,
    views: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    grads: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Train ``params`` on ``data``; shuffling and dropout are drawn from ``seed``. Returns loss and counts.

    ``objective`` adds its loss term on ``views()`` (the client's tensors, differentiable) and corrects
    ``grads()`` (views of their gradients) after ``backward``.
    """
    if len(data) == 0:
        raise ValueError("a client has no training examples")
    if not params:
        raise ValueError("nothing to train: the plan's trainable set is empty")
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
            total = loss
            if objective is not None and views is not None:
                extra = objective.loss(views())
                if extra is not None:
                    total = loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            if objective is not None and grads is not None:
                objective.after_backward(grads())
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            if objective is not None and views is not None:
                with torch.no_grad():
                    objective.after_step(views(), settings.lr)
            steps += 1
            seen += len(index)
            loss_sum += loss.item() * len(index)
            if budget is not None and steps >= budget:
                break
        epoch += 1
    return {"train_loss": loss_sum / max(seen, 1), "steps": steps, "samples_seen": seen}


class ClientDropped(RuntimeError):
    """A simulated client failure (the plan's ``fail_after``): the client stopped mid-round without replying."""


def _budget(settings: TrainSettings, n: int, work: float) -> TrainSettings:
    """``settings`` for a client that does ``work`` (0..1] of its local steps (at least one step)."""
    if work >= 1.0:
        return settings
    full = settings.steps if settings.steps is not None else settings.epochs * math.ceil(n / settings.batch_size)
    return dataclasses.replace(settings, steps=max(1, math.ceil(work * full)))


def _grad_views(slots: AdapterSlots, keys: list[str], ranks: Mapping[str, ModuleRank]) -> dict[str, torch.Tensor]:
    """Views of the gradients of ``keys`` at the client's rank (keys without a gradient are left out)."""
    grads = {k: slots.params[k].grad for k in keys}
    return {k: slots.view(k, ranks, g) for k, g in grads.items() if g is not None}


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
    """One client's turn: returns its reply (encoded with the plan's codec) and the personal state it keeps."""
    start = method.start_state(plan, initial, personal)
    objective = method.objective(plan, start, personal)
    ranks = plan.ranks
    # side tensors (control variates, anchors) stay out of the model; the method sees them again in finish()
    slots.load({k: v for k, v in start.items() if k in slots.params})
    slots.set_scales({k: v.scale for k, v in ranks.items()}, None)
    steps = seen = 0
    loss_sum = 0.0
    stage_settings = _budget(settings, len(data), plan.work)
    if plan.fail_after is not None:
        stage_settings = _budget(settings, len(data), plan.fail_after * plan.work)
    try:
        for i, stage in enumerate(plan.stages):
            slots.set_scales(None, stage.adapter_weights)
            keys = sorted(stage.train_keys)
            params = slots.set_trainable(keys)
            stats = train_local(
                slots.model,
                params,
                task,
                data,
                stage_settings,
                seed=derive_seed(run_seed, "train", plan.round, plan.client_id, *([i] if i else [])),
                pad_id=pad_id,
                objective=objective,
                views=lambda keys=keys: {k: slots.view(k, ranks) for k in keys},
                grads=lambda keys=keys: _grad_views(slots, keys, ranks),
            )
            steps += int(stats["steps"])
            seen += int(stats["samples_seen"])
            loss_sum += float(stats["train_loss"]) * int(stats["samples_seen"])
            if plan.fail_after is not None:
                raise ClientDropped(f"client {plan.client_id} dropped out after {steps} local steps (simulated)")
        trained = {**start, **slots.read([k for k in start if k in slots.params], ranks)}
    finally:
        slots.reset_scales()
    train_stats = TrainStats(steps=steps, samples_seen=seen, train_loss=loss_sum / max(seen, 1), lr=settings.lr)
    upload, keep = method.finish(plan, trained, personal, train_stats)
    reply_ranks = {}
    for name, mr in ranks.items():
        a = upload.get(name + LORA_A_SUFFIX)
        reply_ranks[name] = ModuleRank(int(a.shape[0]) if a is not None else mr.rank, mr.scale)
    payload = encode_state(parse_codec(plan.upload_codec), upload, plan.download)
    update = ClientUpdate(
        client_id=plan.client_id,
        state=payload,
        num_examples=len(data),
        samples_seen=seen,
        metrics={"train_loss": train_stats.train_loss, "steps": steps, "samples_seen": seen},
        ranks=reply_ranks,
    )
    return update, keep
