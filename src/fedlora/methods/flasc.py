"""FLASC: dense local LoRA training, sparse communication, a server optimiser step (METHODS.md §25).

Paper: K. Kuo, A. Raje, K. Rajesh, V. Smith, "Federated LoRA with Sparse Communication", arXiv:2406.05233 (2024)
(reference code ``imkevinkuo/flasc@17c7063``, ``train_sparse_lora_dp.py:fl_train``).

All trainable parameters ``θ`` (LoRA A, B and heads: ``layout.all_keys``) are treated as one flat vector; A and B
are independent coordinates (no discordance fix).

* **Down**: ``θ`` sparsified to its ``⌊download_density·|θ|⌋`` largest magnitudes, jointly over all tensors (the
  top-k download mask, recomputed every round), sent as the ``topk:<download_density>`` codec (float32 values +
  int32 indices); at density 1 the whole ``θ`` travels (with the run's download codec, if any).
* **Local**: the client trains every entry of A, B and the heads densely from what it received (the run's local
  optimiser; the reference code uses SGD with momentum 0.9, recreated every round).
* **Up**: the change ``Δ_k = θ_k − θ_dl`` from the received ``θ_dl``, sparsified to its ``⌊upload_density·|θ|⌋``
  largest magnitudes jointly: the ``topk:<upload_density>`` codec, which encodes exactly that change because the
  client holds ``θ_dl`` (delta encoding, :mod:`fedlora.client.codecs`); the server decodes ``θ_dl + Δ̂_k``.
* **Server**: it recomputes ``θ_dl`` (the download codec's round trip of its own ``θ``, deterministic), takes
  ``Δ_k = θ_k − θ_dl``, the pseudo-gradient ``g = −Σ_k p_k Δ_k`` (``p_k`` uniform by default: the reference code
  divides the sum by the server batch) and makes one step of a real torch optimiser on ``θ`` with ``.grad = g``:
  ``server_opt="adamw"`` (``torch.optim.AdamW``; the reference code's ``adam`` is AdamW with torch's default weight
  decay 0.01) or ``"sgd"`` (plain, as in the reference code; ``server_momentum`` optional). With both densities 1,
  ``server_opt=sgd``, ``server_lr=1`` this is FedAvg of A and B (uniform weights).

Up: ``⌊ul·|θ|⌋`` float32 values + int32 indices (``2·ul·|θ|`` words) when ``upload_density < 1``, else
``r(m+n) + heads``; down likewise with ``download_density``.

Choices the paper and the reference code leave open (documented; the tunable ones are options):

* **Server learning rate.** The reference default is ``1e-3`` for 200 rounds of ViT fine-tuning. An Adam step moves
  each coordinate by about ``server_lr`` whatever the size of the pseudo-gradient, so ``1e-3`` barely moves an
  adapter whose B starts at zero within a few rounds (5 rounds of the tiny end-to-end task stay at chance). The
  default here is ``server_lr=3e-2``: about the per-coordinate size of one round of local updates at the library's
  defaults (local AdamW, lr 3e-3, a few dozen steps), so a server step moves θ about as far as FedAvg would, with
  Adam's per-coordinate normalisation (on that task ``1e-2`` learns barely, ``1e-1`` overshoots the LoRA A entries
  and stays at chance). Set ``server_lr=1e-3`` for the reference setting.
* **Optimiser state** (``exp_avg``, ``exp_avg_sq``; ``momentum_buffer`` for sgd with momentum) lives in
  ``ServerState.tensors`` as ``"flasc.exp_avg/<key>"``, ``"flasc.exp_avg_sq/<key>"``, ``"flasc.momentum/<key>"``
  and the step count in ``meta["server_step"]``, so a resumed run continues the same optimiser exactly. The
  optimiser runs in float32 on float32 copies of ``θ`` (``foreach=False``).
* **Global model.** With ``download_density < 1`` the server's dense ``θ`` is kept under ``"flasc.theta/<key>"``
  and, with ``global_model="masked"`` (the reference code's ``--eval-masked true``), ``server.adapter`` — the model
  that is evaluated and saved — is what clients receive (``θ`` top-k masked); ``"dense"`` evaluates the dense ``θ``.
* **Codecs.** A density below 1 sets the plan's codec; when the run config already sets a codec for that direction
  (anything but ``none``), the two would conflict and the method refuses to start. With density 1 the run's codec
  applies unchanged. Decay of the densities, DP clipping/noise and the freeze variants are not implemented.
* **Robust aggregators.** ``aggregator=median`` or ``trimmed_mean:<beta>`` replaces ``Σ_k p_k Δ_k`` by the
  coordinate-wise statistic of the ``Δ_k`` (unweighted). With a sparse upload (``upload_density < 1``) each ``Δ_k`` is
  zero outside the client's own top-k, so a coordinate fewer than half of the clients sent has median 0: only
  coordinates most clients agree to send move (the trimmed mean keeps more of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.state import AdapterState, clone_state, namespaced, subset
from fedlora.client.codecs import parse_codec, roundtrip
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ServerState,
    option,
    register_method,
)

THETA = "flasc.theta"
EXP_AVG = "flasc.exp_avg"
EXP_AVG_SQ = "flasc.exp_avg_sq"
MOMENTUM = "flasc.momentum"
STEP = "server_step"


@dataclass(frozen=True)
class FLASCOptions:
    download_density: float = option(
        1.0, "fraction of θ sent down (global top-k of |θ|); 1 = dense", minimum=1e-9, maximum=1.0
    )
    upload_density: float = option(
        1.0, "fraction of θ sent up (global top-k of |θ_k − θ_dl|); 1 = dense", minimum=1e-9, maximum=1.0
    )
    server_opt: str = option("adamw", "server optimiser on the pseudo-gradient", choices=("adamw", "sgd"))
    server_lr: float = option(
        3e-2,
        "server learning rate (reference: 1e-3 over 200 rounds; an Adam step moves each coordinate by ~lr, so the "
        "default matches the size of one round of local updates)",
        minimum=0.0,
    )
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay (adamw only; torch's default)", minimum=0.0)
    beta1: float = option(0.9, "AdamW beta1", minimum=0.0, maximum=0.999999)
    beta2: float = option(0.999, "AdamW beta2", minimum=0.0, maximum=0.999999)
    eps: float = option(1e-8, "AdamW epsilon", minimum=0.0)
    server_momentum: float = option(0.0, "momentum of the sgd server optimiser (reference: none)", minimum=0.0)
    global_model: str = option(
        "masked",
        "with download_density < 1: the global model evaluated and saved is what clients receive (masked, the "
        "reference's --eval-masked true) or the server's dense θ",
        choices=("masked", "dense"),
    )


def _topk(density: float) -> str:
    return f"topk:{density!r}"


@register_method
class FLASC(FedMethod):
    id = "flasc"
    family = "communication-efficient (sparse up/down, server optimiser)"
    paper = "Kuo et al., arXiv:2406.05233"
    up = "top-k of Δ_k = θ_k − θ_dl over A, B, heads (values + indices)"
    down = "top-k of θ over A, B, heads (values + indices)"
    bytes_up = "2·ul·(r(m+n) + heads) when upload_density < 1 (values + int32 indices), else r(m+n) + heads"
    bytes_down = "2·dl·(r(m+n) + heads) when download_density < 1 (values + int32 indices), else r(m+n) + heads"
    default_weighting = "uniform"
    Options = FLASCOptions

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__(ctx, options)
        o = self.options
        for direction, density, configured in (
            ("download", o.download_density, ctx.download_codec),
            ("upload", o.upload_density, ctx.upload_codec),
        ):
            if density < 1 and parse_codec(configured).kind != "none":
                raise ValueError(
                    f"flasc: {direction}_density={density} sets the {direction} codec to {_topk(density)}, but the "
                    f"run config already sets {direction}_codec={configured!r}; use one of them"
                )

    # ----------------------------------------------------------------- codecs
    @property
    def download_codec(self) -> str:
        d = self.options.download_density
        return _topk(d) if d < 1 else self.ctx.download_codec

    @property
    def upload_codec(self) -> str:
        d = self.options.upload_density
        return _topk(d) if d < 1 else self.ctx.upload_codec

    @property
    def masked(self) -> bool:
        return self.options.download_density < 1

    def theta(self, server: ServerState) -> AdapterState:
        """The server's dense θ (``server.adapter`` unless the download is masked)."""
        keys = self.layout.all_keys
        if self.masked:
            return {k: server.tensors[namespaced(THETA, k)] for k in keys}
        return subset(server.adapter, keys)

    def received(self, theta: AdapterState) -> AdapterState:
        """``θ_dl``: exactly what a client decodes from the download of ``theta``."""
        codec = parse_codec(self.download_codec)
        return dict(theta) if codec.kind == "none" else roundtrip(codec, theta)

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if not self.masked:
            return server
        return self._with_theta(server, server.adapter, {}, server.meta)

    def _with_theta(
        self, server: ServerState, theta: AdapterState, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> ServerState:
        adapter, tensors = self._publish(server.adapter, theta, state)
        return dataclasses.replace(server, adapter=adapter, tensors=tensors, meta=meta)

    def _publish(
        self, old_adapter: AdapterState, theta: AdapterState, state: dict[str, torch.Tensor]
    ) -> tuple[AdapterState, dict[str, torch.Tensor]]:
        """The global adapter and the server tensors for a new dense ``θ`` and optimiser state."""
        tensors = dict(state)
        adapter = dict(old_adapter)
        if self.masked:
            tensors.update({namespaced(THETA, k): v for k, v in theta.items()})
            adapter.update(self.received(theta) if self.options.global_model == "masked" else theta)
        else:
            adapter.update(theta)
        return adapter, tensors

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.layout.all_keys
        plan = self.make_plan(rnd, client_id, server, download=self.theta(server), upload_keys=keys)
        return dataclasses.replace(plan, download_codec=self.download_codec, upload_codec=self.upload_codec)

    def pseudo_gradient(self, server: ServerState, updates: Sequence[ClientUpdate]) -> AdapterState:
        """``g = −Σ_k p_k (θ_k − θ_dl)`` per key, float32 (or minus the robust statistic: :meth:`combine`)."""
        theta_dl = self.received(self.theta(server))
        w = self.weights(updates)
        g: AdapterState = {}
        for k in self.layout.all_keys:
            ref = theta_dl[k].float()
            g[k] = -self.combine((u.state[k].float() - ref for u in updates), w)
        return g

    def server_step(
        self, theta: AdapterState, grad: AdapterState, tensors: dict[str, torch.Tensor], step: int
    ) -> tuple[AdapterState, dict[str, torch.Tensor]]:
        """One step of the server optimiser on ``theta`` with gradient ``grad``, resuming its saved state."""
        o = self.options
        keys = self.layout.all_keys
        params = {k: torch.nn.Parameter(theta[k].detach().float().clone()) for k in keys}
        for k, p in params.items():
            p.grad = grad[k].detach().float().clone()
        opt: torch.optim.Optimizer
        if o.server_opt == "adamw":
            opt = torch.optim.AdamW(
                list(params.values()),
                lr=o.server_lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                weight_decay=o.weight_decay,
                foreach=False,
            )
            if step > 0:
                for k, p in params.items():
                    opt.state[p] = {
                        "step": torch.tensor(float(step), dtype=torch.float32),
                        "exp_avg": tensors[namespaced(EXP_AVG, k)].float().clone(),
                        "exp_avg_sq": tensors[namespaced(EXP_AVG_SQ, k)].float().clone(),
                    }
        else:
            opt = torch.optim.SGD(list(params.values()), lr=o.server_lr, momentum=o.server_momentum, foreach=False)
            if step > 0 and o.server_momentum > 0:
                for k, p in params.items():
                    opt.state[p] = {"momentum_buffer": tensors[namespaced(MOMENTUM, k)].float().clone()}
        opt.step()
        state: dict[str, torch.Tensor] = {}
        for k, p in params.items():
            s = opt.state.get(p, {})
            if o.server_opt == "adamw":
                state[namespaced(EXP_AVG, k)] = s["exp_avg"].detach().clone()
                state[namespaced(EXP_AVG_SQ, k)] = s["exp_avg_sq"].detach().clone()
            elif s.get("momentum_buffer") is not None:
                state[namespaced(MOMENTUM, k)] = s["momentum_buffer"].detach().clone()
        new_theta = {k: p.detach().to(theta[k].dtype).clone() for k, p in params.items()}
        return new_theta, state

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        theta = self.theta(server)
        grad = self.pseudo_gradient(server, updates)
        step = int(server.meta.get(STEP, 0))
        new_theta, state = self.server_step(theta, grad, server.tensors, step)
        adapter, tensors = self._publish(server.adapter, new_theta, state)
        meta = {**server.meta, STEP: step + 1}
        return AggregateResult(adapter=clone_state(adapter), tensors=tensors, meta=meta)
