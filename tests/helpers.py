"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from fedlora.adapters import LoraLayout

HEAD = "head.weight"


def random_state(layout: LoraLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for spec in layout.modules:
        state[spec.a_key] = torch.randn(spec.rank, spec.in_features, generator=gen)
        state[spec.b_key] = torch.randn(spec.out_features, spec.rank, generator=gen)
    state[HEAD] = torch.randn(3, 5, generator=gen)
    return state


def pretrained_weights(layout: LoraLayout, seed: int = 7):
    """A stand-in for a run's pretrained weights (``MethodContext.base_weights``): one seeded random ``(out, in)``
    matrix per module, for methods that initialise from them (FeDeRA)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {spec.name: torch.randn(spec.out_features, spec.in_features, generator=gen) for spec in layout.modules}
    return lambda: weights


LORA_KW = dict(
    task_type="SEQ_CLS",
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=None,
    modules_to_save=None,
    use_rslora=False,
    init_lora_weights="default",
    seed=0,
)
"""Arguments of ``fedlora.models.loading.wrap_lora`` for the tiny test models."""


def tiny_config(model: str, tmp_path, **kw):
    """A run on a tiny test model: 4 clients, Dirichlet(1.0), 5 rounds of 2 local epochs, 100 examples per label,
    no progress bar, one thread; ``kw`` overrides any option."""
    from fedlora import RunConfig

    base = dict(
        model=model,
        clients=4,
        rounds=5,
        max_examples_per_label=100,
        local_epochs=2,
        partition="dirichlet:1.0",
        global_test_fraction=0.2,
        progress=False,
        out_dir=str(tmp_path),
        threads=1,
    )
    base.update(kw)
    return RunConfig(**base)


def tiny_cli_args(model: str, out, *extra: str) -> list[str]:
    """``fedlora run`` arguments for a one-round, two-client run on ``model`` into ``out`` (one thread, no
    progress bar); ``extra`` flags follow and override."""
    return [
        "run",
        "--model",
        model,
        "--clients",
        "2",
        "--rounds",
        "1",
        "--max-examples-per-label",
        "10",
        "--partition",
        "iid",
        "--out-dir",
        str(out),
        "--progress",
        "false",
        "--threads",
        "1",
        *extra,
    ]


def flower_run_config(model: str, out, name: str, **kw) -> dict:
    """A Flower run config (dashed keys) for a short run on a tiny model: 3 clients, 2 rounds, 30 examples per label."""
    rc = {
        "model": model,
        "clients": 3,
        "rounds": 2,
        "max-examples-per-label": 30,
        "local-epochs": 1,
        "partition": "dirichlet:1.0",
        "global-test-fraction": 0.2,
        "threads": 1,
        "out-dir": str(out),
        "run-name": name,
    }
    rc.update(kw)
    return rc


def read_metrics(run_dir) -> list[dict]:
    """The records of a run directory's ``metrics.jsonl``."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
