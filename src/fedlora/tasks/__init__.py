"""Tasks: batching, loss and metrics behind one interface (:class:`fedlora.tasks.base.Task`)."""

from fedlora.tasks.base import Encoded, Task
from fedlora.tasks.classification import SequenceClassification

TASKS: dict[str, type[Task]] = {"classification": SequenceClassification}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Encoded", "SequenceClassification", "Task", "get_task"]
