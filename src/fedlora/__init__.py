"""fedlora: federated fine-tuning of foundation models with LoRA and other parameter-efficient methods.

>>> from fedlora import RunConfig, run
>>> result = run(RunConfig(method="flexlora", clients=10, rounds=20))   # doctest: +SKIP
"""

from typing import Any

from fedlora.config import ConfigError, RunConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "RunConfig", "RunResult", "__version__", "load_trained", "resume", "run"]

_API = ("RunResult", "load_trained", "resume", "run")


def __getattr__(name: str) -> Any:
    """The API functions load torch and transformers on first use, not on ``import fedlora`` (a Flower ClientApp
    process that only forwards messages to its node's worker stays light)."""
    if name in _API:
        from fedlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
