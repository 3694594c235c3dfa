"""Client work: start from the plan's adapter, train the planned tensors with a plain torch loop, reply.

The same function serves every engine: the local engine calls it with its one shared model, a Flower
``ClientApp`` with the model it holds. The loop is written once; a method shapes it only through what its plan
and objective declare (stages and trainable sets, extra loss terms, gradient corrections). A fresh optimiser is
built for every stage of every round (as in every reference implementation: Adam moments are reset each round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.peft_io import AdapterSlots
from fedlora.adapters.state import LORA_A_SUFFIX, AdapterState
from fedlora.client.codecs import encode_state, parse_codec
from fedlora.client.objectives import Objective
from fedlora.methods.base import ClientPlan, ClientUpdate, FedMethod, ModuleRank, TrainStats, derive_seed
from fedlora.privacy.dpsgd import pass_steps, sample_rate
from fedlora.privacy.user_level import UserLevelDP, privatize_upload
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
    dp_sgd_noise: float | None = None
    """DP-SGD noise multiplier σ (None: ordinary training); see :func:`train_local`."""
    dp_sgd_clip: float = 1.0
    """DP-SGD bound C on each example's gradient norm (replaces ``max_grad_norm`` when DP-SGD is on)."""
    user_dp: UserLevelDP | None = None
    """User-level DP; with ``noise_at="client"`` the client clips and noises its own update before it travels."""


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
    ``grads()`` (views of their gradients) after ``backward``. With ``settings.dp_sgd_noise`` set the loop is
    DP-SGD (:func:`_train_dp_sgd`).
    """
    if len(data) == 0:
        raise ValueError("a client has no training examples")
    if not params:
        raise ValueError("nothing to train: the plan's trainable set is empty")
    if settings.dp_sgd_noise is not None:
        return _train_dp_sgd(
            model, params, task, data, settings, seed=seed, pad_id=pad_id, objective=objective, views=views, grads=grads
        )
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


_OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


def _rank_masks(
    params: list[torch.nn.Parameter], grads: Callable[[], Mapping[str, torch.Tensor]] | None
) -> list[torch.Tensor | None]:
    """Per parameter, the entries inside the client's rank (None: all). A lower-rank client trains the first rank
    slots of the shared model's zero-padded factors: ordinary training leaves the padding at zero (its gradient is
    zero), DP-SGD's noise would not, so the noised gradient is cut to the client's rank (post-processing)."""
    if grads is None:
        return [None] * len(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in grads().values():  # views of p.grad at the client's rank
        g.fill_(1.0)
    masks: list[torch.Tensor | None] = []
    for p in params:
        inside = p.grad != 0
        masks.append(None if bool(inside.all()) else inside)
        p.grad = None
    return masks


def _unhook(hooks: Any, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Undo DP-SGD's changes to the shared model: opacus' hooks, and what it leaves on parameters and modules
    (per-example gradients, recorded activations); the noised gradients are dropped."""
    hooks.cleanup()
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for m in model.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)
    for p in params:
        p.grad = None


def _train_dp_sgd(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    task: Task,
    data: Encoded,
    settings: TrainSettings,
    *,
    seed: int,
    pad_id: int,
    objective: Objective | None,
    views: Callable[[], Mapping[str, torch.Tensor]] | None,
    grads: Callable[[], Mapping[str, torch.Tensor]] | None,
) -> dict[str, float]:
    """DP-SGD (Abadi et al., CCS 2016) with opacus, on ``params`` (the plan's trainable tensors) only.

    Steps: ``local_steps``, or ``epochs × ⌈n/B⌉``. Each draws a Poisson sample of the ``n`` examples (rate
    ``q = min(1, B/n)``, seeded; it may be empty), opacus computes every example's gradient of ``params`` through
    hooks on the modules that hold them (LoRA factors, task heads; frozen weights get none and never change),
    clips it to norm ``dp_sgd_clip``, sums, adds ``N(0, (σ·clip)²)`` noise (seeded) and divides by the expected batch
    size ``min(B, n)``. ``max_grad_norm`` is not applied: the per-example clip replaces it. An objective's loss term
    and gradient correction depend on the parameters only, never on the data, so their gradient is added after the
    noise (post-processing: no privacy cost); then the optimiser steps. The hooks are removed when the pass ends,
    also on error, so the shared model is a plain peft model again for the next client.
    """
    try:
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer
    except ImportError as e:  # pragma: no cover - opacus is installed with the privacy extras
        raise ImportError("dp_sgd_noise needs opacus (pip install opacus)") from e
    noise, clip = settings.dp_sgd_noise, settings.dp_sgd_clip
    if noise is None or not (math.isfinite(noise) and noise >= 0) or not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"DP-SGD needs dp_sgd_noise >= 0 and dp_sgd_clip > 0 (got {noise!r}, {clip!r})")
    mine = {id(p) for p in params}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
    if stray:
        raise ValueError(f"DP-SGD trains the plan's tensors only, but these require gradients too: {stray[:3]}")
    n = len(data)
    q = sample_rate(settings.batch_size, n)
    total = pass_steps(n, settings.batch_size, epochs=settings.epochs, steps=settings.steps)
    masks = _rank_masks(params, grads)
    model.train()  # before the hooks: opacus records activations of modules in training mode only
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # Poisson batches
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, "dp-sgd-noise"))
    steps, seen, loss_sum = 0, 0, 0.0
    with contextlib.ExitStack() as undo:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        undo.callback(_unhook, hooks, model, params)
        undo.enter_context(warnings.catch_warnings())
        # torch notes that the hooks fire on module outputs when no module input needs a gradient: expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        opt = DPOptimizer(
            make_optimizer(params, settings),
            noise_multiplier=noise,
            max_grad_norm=clip,
            expected_batch_size=min(settings.batch_size, n),
            generator=noise_gen,
        )
        for _ in range(total):
            index = torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist()
            opt.zero_grad(set_to_none=True)
            if index:
                loss = task.loss(model, task.collate(data, index, pad_id))
                loss.backward()
                loss_sum += loss.item() * len(index)
            else:  # an empty sample: the step adds noise only
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            opt.pre_step()  # clip each example's gradient, sum, add noise, divide -> p.grad
            if objective is not None:
                if views is not None:
                    extra = objective.loss(views())
                    if extra is not None:
                        for p, g in zip(params, torch.autograd.grad(extra, params, allow_unused=True), strict=True):
                            if g is not None:
                                p.grad.add_(g)
                if grads is not None:
                    objective.after_backward(grads())
            for p, inside in zip(params, masks, strict=True):
                if inside is not None:
                    p.grad.mul_(inside)
            opt.original_optimizer.step()
            if objective is not None and views is not None:
                with torch.no_grad():
                    objective.after_step(views(), settings.lr)
            steps += 1
            seen += len(index)
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
    dp = settings.user_dp
    if dp is not None and dp.noise_at == "client":  # user-level DP, client noise: the update is clipped and noised
        gen = dp.generator("client", plan.round, plan.client_id)  # before it leaves (what it keeps is not)
        upload = privatize_upload(upload, method.reference(plan), clip=dp.clip, noise=dp.noise, generator=gen)
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
