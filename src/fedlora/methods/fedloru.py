"""FedLoRU: FedAvg of the LoRA factors, merged into the frozen weights and re-initialised every τ rounds
(METHODS.md §14).

Paper: H. Park, D. Klabjan, "Communication-Efficient Federated Low-Rank Update Algorithm and its Connection to
Implicit Regularization", arXiv:2409.12371 (2024). Reference code: ``haemPark/fedloru_official@219688b``
(``src/algorithm/fedloru/main.py``; ResNet Conv2d only).

Every round the server averages A and B separately (``p_k ∝ n_k``, as the reference code, discordance included);
after every τ-th aggregation (rounds τ, 2τ, … counted from 1) it accumulates the update into the frozen weights and
re-initialises LoRA: ``W ← W + s·B̄Ā`` (travels factored, ``(s·B̄, Ā)``: ``r(m+n)`` per module), ``A ← fresh``,
``B ← 0``. The function is unchanged by a merge, and ``W_T − W_0 = Σ_{merge rounds} s·B_t A_t``: the accumulated
update can reach a rank of ``r·(T/τ)``. This is :class:`fedlora.methods.init_policies.ReInitial` with period τ:
the fresh A comes from one seed common to the round's clients (the reference draws it on the server's global
model, which every client then downloads; the effect is the same, and only the seed travels).

Not copied from the reference code: its ``merge()`` branch (``--accumulate``) adds ``s·BA`` into W but keeps A, B, so
the function jumps to ``W + 2s·BA``; here a merge always re-initialises. Its server module is empty (the committed
code does not run), and it trains from scratch with zero-initialised W on vision models; here W is the pretrained
weight, as in the paper's description. Clients continue from the global adapter between merges, with a fresh
optimiser every round.

Option ``period`` (τ): the reference README merges every 50 of 400 rounds; the default, 2, fits the short runs of
this library (set it to about an eighth of the rounds to follow the README's ratio).
Up: A, B, heads (``r(m+n)``). Down: A, B, heads (``r(m+n)``), and after a merge round heads + the merged factors as a
base change (``r(m+n)``) with the fresh LoRA given as a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.methods.base import option, register_method
from fedlora.methods.fedit import FedIT
from fedlora.methods.init_policies import ReInitial


@dataclass(frozen=True)
class FedLoRUOptions:
    period: int = option(
        2, "merge into the frozen weights and re-initialise LoRA every this many rounds (tau)", minimum=1
    )


@register_method
class FedLoRU(ReInitial, FedIT):
    id = "fedloru"
    aliases = ()
    family = "initialisation (periodic merge + re-init)"
    paper = "Park & Klabjan, arXiv:2409.12371"
    up = "A, B, heads"
    down = "A, B, heads; every tau rounds the merged (s*B, A) as a base change and a fresh-LoRA seed"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads (+ r(m+n) base change every tau rounds)"
    default_weighting = "num_examples"
    Options = FedLoRUOptions

    def reinit_period(self) -> int:
        return self.options.period
