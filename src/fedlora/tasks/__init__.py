"""Tasks: batching, loss and metrics behind one interface (:class:`fedlora.tasks.base.Task`)."""

from typing import Any

from fedlora.tasks.base import Encoded, Task
from fedlora.tasks.causal_lm import CausalLM
from fedlora.tasks.classification import SequenceClassification

TASKS: dict[str, type[Task]] = {"classification": SequenceClassification, "causal-lm": CausalLM}


def get_task(name: str, cfg: Any = None) -> Task:
    """The task ``name``, with the task options of the run configuration ``cfg`` (defaults without one)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]() if cfg is None else TASKS[name].from_config(cfg)


__all__ = ["TASKS", "CausalLM", "Encoded", "SequenceClassification", "Task", "get_task"]
