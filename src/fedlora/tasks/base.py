"""The task interface: how examples become batches, what the loss is and how a model is scored.

The engine only calls these methods, so a new task (the causal-LM supervised fine-tuning task, say) plugs in
without touching the engine or the round logic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples of one split: token ids per example and the task's targets (one entry per example:
    a class id for classification; a task may store per-token labels instead)."""

    input_ids: list[list[int]]
    targets: Any

    def __len__(self) -> int:
        return len(self.input_ids)


class Task(ABC):
    """A supervised task over text examples."""

    name: str
    peft_task_type: str
    default_model: str = "default"
    """What ``model = "default"`` means for this task (a name :func:`fedlora.models.resolve_model` knows)."""
    default_dataset: str = "default"
    """What ``dataset = "default"`` means for this task (a source :func:`fedlora.data.load_table` knows)."""
    headline_metrics: tuple[str, ...] = ("accuracy",)
    """The metrics of :meth:`evaluate` that progress lines and summaries show."""

    @classmethod
    def from_config(cls, cfg: Any) -> Task:
        """The task with the run configuration's task options (a :class:`fedlora.config.RunConfig`)."""
        return cls()

    @property
    def extra_columns(self) -> dict[str, str]:
        """Data columns the task needs besides ``text`` and ``label``: ``{its name: the dataset's column}``."""
        return {}

    @abstractmethod
    def load_model(self, source: str, *, num_labels: int | None, seed: int) -> torch.nn.Module:
        """The base model for this task (before LoRA wrapping); ``num_labels`` for tasks with a head."""

    @abstractmethod
    def encode(self, tokenizer: Any, data: Any, max_length: int) -> Encoded:
        """Tokenise a split (a ``datasets.Dataset`` with the task's columns) once; batches are cut from the result
        every round."""

    @abstractmethod
    def collate(self, encoded: Encoded, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """A model-ready batch of the examples at ``index``."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the batch (differentiable)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, encoded: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
        """Metrics over a split, e.g. ``{"loss": …, "accuracy": …, "examples": n}``: every entry but ``examples``
        is reported as ``global_<name>`` (held-out split) and ``personal_<name>`` (clients' own splits, weighted by
        ``examples``)."""

    def batch_indices(self, n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
        """Shuffled (if a generator is given) index batches covering ``range(n)`` once."""
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
