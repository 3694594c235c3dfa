"""Sequence classification: cross-entropy on ``AutoModelForSequenceClassification`` logits, accuracy."""

from __future__ import annotations

from typing import Any

import torch

from fedlora.models.loading import load_sequence_classifier
from fedlora.tasks.base import Encoded, Task


class SequenceClassification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"

    def load_model(self, source: str, *, num_labels: int | None, seed: int) -> torch.nn.Module:
        if not num_labels:
            raise ValueError("sequence classification needs the number of labels")
        return load_sequence_classifier(source, num_labels, seed=seed)

    def encode(self, tokenizer: Any, data: Any, max_length: int) -> Encoded:
        """Columns ``text`` (str) and ``label`` (int class id)."""
        texts, labels = list(data["text"]), list(data["label"])
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        return Encoded(input_ids=ids, targets=torch.tensor(labels, dtype=torch.long))

    def collate(self, encoded: Encoded, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        rows = [encoded.input_ids[i] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": encoded.targets[index]}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, encoded: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
        n = len(encoded)
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "examples": 0}
        was_training = model.training
        model.eval()
        # sort by length so each batch pads little; the metric does not depend on order
        order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))
        total_loss, correct = 0.0, 0
        for start in range(0, n, batch_size):
            batch = self.collate(encoded, order[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        return {"loss": total_loss / n, "accuracy": correct / n, "examples": n}
