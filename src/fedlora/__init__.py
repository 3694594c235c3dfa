"""fedlora: federated fine-tuning of foundation models with LoRA and other parameter-efficient methods.

>>> from fedlora import RunConfig, run
>>> result = run(RunConfig(method="flexlora", clients=10, rounds=20))   # doctest: +SKIP
"""

from fedlora.api import RunResult, load_trained, resume, run
from fedlora.config import ConfigError, RunConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "RunConfig", "RunResult", "__version__", "load_trained", "resume", "run"]
