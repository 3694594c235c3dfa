"""Where each method sits in the survey's taxonomy (Yang et al., "Federated Low-Rank Adaptation for Foundation
Models: A Survey", §3–5 and Table 1), with the FL optimisers on adapters (METHODS.md §36) as an area of their own.

The survey's areas are distributed learning (server aggregation, then LoRA initialisation), heterogeneity and
efficiency; its categories are the rows of its Table 1. The 2025–26 methods of METHODS.md Part II sit in the
category their mechanism belongs to. A registered method without an entry here is an error
(``tests/test_registry.py``), so ``fedlora methods`` can always place it.
"""

from __future__ import annotations

AREAS: tuple[str, ...] = (
    "distributed learning: server aggregation",
    "distributed learning: LoRA initialisation",
    "heterogeneity",
    "efficiency",
    "FL optimisers on adapters",
)
"""The areas in the order the survey presents them."""

TAXONOMY: dict[str, tuple[str, str]] = {
    # §3.1 server aggregation
    "fedit": (AREAS[0], "FedAvg of A and B"),
    "ffa_lora": (AREAS[0], "single low-rank matrix"),
    "colr": (AREAS[0], "single low-rank matrix"),
    "rolora": (AREAS[0], "single low-rank matrix"),
    "lora_a2": (AREAS[0], "single low-rank matrix"),
    "fed_sb": (AREAS[0], "single low-rank matrix"),
    "flexlora": (AREAS[0], "full-size matrix"),
    "flora": (AREAS[0], "full-size matrix"),
    "fedsvd": (AREAS[0], "full-size matrix"),
    "florist": (AREAS[0], "full-size matrix"),
    "fedex_lora": (AREAS[0], "corrective mechanism"),
    "lora_fair": (AREAS[0], "corrective mechanism"),
    "fedrot_lora": (AREAS[0], "corrective mechanism"),
    "fedinc": (AREAS[0], "rank clustering"),
    # §3.2 initialisation
    "slora": (AREAS[1], "server-side, data-driven"),
    "federa": (AREAS[1], "server-side, data-driven"),
    "init_avg": (AREAS[1], "client-side"),
    "init_re": (AREAS[1], "client-side"),
    "init_local": (AREAS[1], "client-side"),
    "fedloru": (AREAS[1], "client-side"),
    # §4 heterogeneity
    "hetlora": (AREAS[2], "heterogeneous rank"),
    "pad_zero": (AREAS[2], "heterogeneous rank"),
    "pad_replicate": (AREAS[2], "heterogeneous rank"),
    "fslora": (AREAS[2], "heterogeneous rank"),
    "fedsa_lora": (AREAS[2], "personalised LoRA"),
    "feddpa": (AREAS[2], "personalised LoRA"),
    "fedalt": (AREAS[2], "personalised LoRA"),
    "fl_tac": (AREAS[2], "clustering"),
    # §5 efficiency
    "flasc": (AREAS[3], "sparse learning"),
    # METHODS.md §36
    "fedprox": (AREAS[4], "client regulariser"),
    "scaffold": (AREAS[4], "client drift correction"),
    "fedavgm": (AREAS[4], "server optimiser"),
    "fedadagrad": (AREAS[4], "server optimiser"),
    "fedadam": (AREAS[4], "server optimiser"),
    "fedyogi": (AREAS[4], "server optimiser"),
}


def taxonomy_of(method_id: str) -> tuple[str, str]:
    """(area, category) of a registered method id."""
    try:
        return TAXONOMY[method_id]
    except KeyError:
        raise KeyError(
            f"method {method_id!r} has no place in the taxonomy: add it to fedlora.methods.taxonomy.TAXONOMY"
        ) from None
