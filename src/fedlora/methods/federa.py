"""FeDeRA: initialise LoRA from the SVD of the pretrained weights, once, on the server; then FedIT (METHODS.md §12).

Paper: Y. Yan, Q. Yang, S. Tang, Z. Shi, "FeDeRA: Efficient Fine-tuning of Language Models in Federated Learning
Leveraging Weight Decomposition", arXiv:2404.18848. No official code; the closest exact reference is peft's PiSSA
initialisation (``huggingface/peft@5d602fd:src/peft/tuners/lora/layer.py:pissa_init``).

Before round 0 the server reads each adapted module's pretrained weight ``W`` in nn.Linear layout ``(out, in)`` (a
Conv1D weight is transposed first, :func:`fedlora.adapters.peft_io.linear_base_weights`), takes its SVD
``W = U S Vᵀ`` and sets the global adapter so that ``s·B A = U_r S_r V_rᵀ`` (the best rank-r approximation of W):

* ``split="sqrt"`` (default, PiSSA): ``A = diag(√(S_r/s))·V_rᵀ``, ``B = U_r·diag(√(S_r/s))``;
* ``split="B"`` (survey eq. 10): ``A = V_rᵀ`` (orthonormal rows), ``B = U_r·S_r / s``.

With ``subtract_residual`` (default) the frozen weight becomes the residual ``W_res = W − s·B A``, so the initial
model is exactly the pretrained one; the change ``−s·B A`` travels factored, ``(−s·B, A)``, inside the first plan
each client receives (``r(m+n)`` per module, once), and the clients never compute an SVD themselves (sign and order
of singular vectors may differ across devices and BLAS builds; every client must start from the same factors).
Without it W is unchanged and the initial model is ``W + U_r S_r V_rᵀ`` (survey eq. 10 says nothing of a residual).
Open (METHODS.md §12, unverified): whether FeDeRA subtracts the residual and how it splits S; both are options.
From round 0 on it is FedIT: clients continue from the global adapter and train A and B, the server averages them
(``p_k ∝ n_k``). The SVD is of the weights the run loads, so it needs a run (``MethodContext.base_weights``).
Up: A, B, heads (``r(m+n)``). Down: A, B, heads (``r(m+n)``), plus the residual's factors once (``r(m+n)``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedlora.adapters.algebra import dense_svd
from fedlora.methods.base import ServerState, option, register_method
from fedlora.methods.fedit import FedIT


@dataclass(frozen=True)
class FeDeRAOptions:
    split: str = option(
        "sqrt",
        "where the singular values go: sqrt = sqrt(S/s) on both factors (PiSSA); B = all of S/s into B, A orthonormal",
        choices=("sqrt", "B"),
    )
    subtract_residual: bool = option(
        True, "replace the frozen weight by W - s*B@A so the initial model equals the pretrained one (PiSSA)"
    )


@register_method
class FeDeRA(FedIT):
    id = "federa"
    aliases = ()
    family = "initialisation (SVD of the pretrained weight)"
    paper = "Yan et al., arXiv:2404.18848"
    up = "A, B, heads"
    down = "A, B, heads; once: the residual -s*B@A as factors"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads (+ r(m+n) once)"
    default_weighting = "num_examples"
    changes_base = True
    Options = FeDeRAOptions

    def svd_init(self, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, ``(A, B)`` (float32) with ``s·B@A`` the rank-r truncated SVD of its weight ``(out, in)``."""
        out = {}
        for spec in self.layout.modules:
            w = weights.get(spec.name)
            if w is None or tuple(w.shape) != (spec.out_features, spec.in_features):
                got = None if w is None else tuple(w.shape)
                raise ValueError(
                    f"{self.id}: pretrained weight of {spec.name} has shape {got}, expected "
                    f"{(spec.out_features, spec.in_features)} (out, in)"
                )
            svd = dense_svd(w.float())
            s, r = spec.scaling(), spec.rank
            if r > svd.s.shape[0]:
                raise ValueError(f"{self.id}: rank {r} exceeds min(out, in) = {svd.s.shape[0]} of {spec.name}")
            if self.options.split == "B":
                a, b = svd.to_lora(r, s)
            else:
                root = (svd.s[:r] / s).sqrt()
                a, b = root[:, None] * svd.vh[:r], svd.u[:, :r] * root
            out[spec.name] = (a, b)
        return out

    def init_server(self, initial: dict[str, torch.Tensor]) -> ServerState:
        server = super().init_server(initial)
        if self.ctx.base_weights is None:
            raise ValueError(
                f"{self.id} initialises LoRA from the SVD of the pretrained weights, which this method was not given: "
                "run it through fedlora.run (or pass MethodContext.base_weights)"
            )
        factors = self.svd_init(dict(self.ctx.base_weights()))
        adapter = dict(server.adapter)
        residual = {}
        for spec in self.layout.modules:
            a, b = factors[spec.name]
            adapter[spec.a_key] = a.to(adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b.to(adapter[spec.b_key].dtype)
            # of the factors as the clients hold them, so that W_res + s·B@A == W holds in their dtype too
            residual[spec.name] = (-spec.scaling() * adapter[spec.b_key].float(), adapter[spec.a_key].float())
        if not self.options.subtract_residual:
            return replace(server, adapter=adapter)
        dense = {name: bf @ af for name, (bf, af) in residual.items()}
        return replace(server, adapter=adapter, base_delta=dense, base_version=1, last_base_update=residual)
