"""Supervised fine-tuning of a decoder (causal LM): prompt → response, loss on the response tokens only.

Layout of one example (``prompt_format``):

* ``chat`` — the tokenizer's chat template: the prompt is the user turn rendered with the generation prompt
  (``add_generation_prompt=True``, optionally after a ``system_prompt``), the response is what the full
  conversation (user + assistant turn) adds after it, end-of-turn tokens included, so the model learns to stop;
* ``plain`` — ``"<prompt>\\n"`` (with the tokenizer's own special tokens, e.g. BOS), then the response and EOS;
* ``auto`` — ``chat`` when the tokenizer has a chat template, else ``plain``.

Prompt and response are tokenised separately and concatenated, so the prompt tokens a model is trained after are
exactly the ones it is given when asked to generate. An example is cut at ``max_length`` tokens; one whose prompt
leaves no response token is dropped (with a warning).

Training loss: the mean over the batch's examples of each example's mean negative log-likelihood of its response
tokens (each example weighs the same, and its gradient depends on it alone, as DP-SGD's per-example clipping needs).
Evaluation: ``loss`` is the mean NLL per response token over the split and ``perplexity`` its exponential;
``exact_match`` and ``rougeL`` (ROUGE-L F1 over lower-cased word tokens) score greedy answers (at most
``max_new_tokens`` tokens, stopping at EOS) to the first ``eval_generations`` prompts of the split against their
references.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.config import ConfigError
from fedlora.tasks.base import Encoded, Task

IGNORE = -100
"""Label of a position without loss (prompt and padding)."""


@dataclass(frozen=True)
class LMTargets:
    """What a causal-LM split holds besides its token ids."""

    prompt_lengths: list[int]
    """Per example, the number of prompt tokens (the loss starts after them)."""
    references: list[str]
    """Per example, the response text (the reference of the generation metrics)."""
    tokenizer: Any = None
    """To decode generated answers."""


_WORD = re.compile(r"\w+")


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and spaces removed (for exact match)."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of the lower-cased word tokens (``\\w+``) of both texts."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0] * (len(ref) + 1)
        for j, r in enumerate(ref, start=1):
            cur[j] = prev[j - 1] + 1 if p == r else max(prev[j], cur[j - 1])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    default_model = "smollm2-135m-instruct"
    default_dataset = "wordnet-definitions"
    headline_metrics = ("loss", "rougeL")

    def __init__(
        self,
        *,
        prompt_format: str = "auto",
        system_prompt: str | None = None,
        eval_generations: int = 8,
        max_new_tokens: int = 32,
        response_column: str = "response",
    ) -> None:
        if prompt_format not in ("auto", "chat", "plain"):
            raise ConfigError(f"prompt_format={prompt_format!r}; allowed: auto, chat, plain")
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.eval_generations = eval_generations
        self.max_new_tokens = max_new_tokens
        self.response_column = response_column

    @classmethod
    def from_config(cls, cfg: Any) -> CausalLM:
        return cls(
            prompt_format=cfg.prompt_format,
            system_prompt=cfg.system_prompt,
            eval_generations=cfg.eval_generations,
            max_new_tokens=cfg.max_new_tokens,
            response_column=cfg.response_column,
        )

    @property
    def extra_columns(self) -> dict[str, str]:
        return {"response": self.response_column}

    def load_model(self, source: str, *, num_labels: int | None, seed: int) -> torch.nn.Module:
        from fedlora.models.loading import load_causal_lm

        return load_causal_lm(source, seed=seed)

    # ------------------------------------------------------------------ layout
    def uses_chat(self, tokenizer: Any) -> bool:
        if self.prompt_format == "auto":
            return bool(getattr(tokenizer, "chat_template", None))
        if self.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format=chat, but the tokenizer has no chat template; use plain or auto")
        return self.prompt_format == "chat"

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": prompt}]

    def render(self, tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
        """The prompt text and the response text (with its end-of-turn / EOS tokens) of one example."""
        if self.uses_chat(tokenizer):
            messages = self._messages(prompt)
            head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if response is None:
                return head, ""
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if not full.startswith(head):
                raise ConfigError(
                    "the chat template renders a conversation that does not start with its own generation prompt; "
                    "use prompt_format=plain"
                )
            return head, full[len(head) :]
        eos = tokenizer.eos_token or ""
        return prompt + "\n", "" if response is None else response + eos

    def tokenize(self, tokenizer: Any, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
        """Prompt token ids and response token ids of one example (see the module docstring)."""
        head, tail = self.render(tokenizer, prompt, response)
        chat = self.uses_chat(tokenizer)  # a rendered template carries its own special tokens
        prompt_ids = tokenizer(head, add_special_tokens=not chat)["input_ids"]
        response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        eos = tokenizer.eos_token_id
        if not chat and response is not None and eos is not None and (not response_ids or response_ids[-1] != eos):
            response_ids = [*response_ids, eos]
        return list(prompt_ids), list(response_ids)

    # ------------------------------------------------------------------ Task
    def encode(self, tokenizer: Any, data: Any, max_length: int) -> Encoded:
        """Columns ``text`` (the prompt) and ``response``."""
        prompts, responses = list(data["text"]), list(data["response"])
        ids, lengths, refs = [], [], []
        dropped = 0
        for prompt, response in zip(prompts, responses, strict=True):
            p, r = self.tokenize(tokenizer, prompt, response)
            if len(p) >= max_length or not r:
                dropped += 1
                continue
            ids.append((p + r)[:max_length])
            lengths.append(len(p))
            refs.append(response)
        if dropped:
            if not ids:
                raise ConfigError(
                    f"max_length={max_length} leaves no response token in any of {dropped} examples (their prompts "
                    "alone fill it); raise --max-length"
                )
            warnings.warn(
                f"dropped {dropped} of {len(prompts)} examples whose prompt fills max_length={max_length} tokens",
                stacklevel=2,
            )
        return Encoded(input_ids=ids, targets=LMTargets(lengths, refs, tokenizer))

    def collate(self, encoded: Encoded, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        rows = [encoded.input_ids[i] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for j, (i, r) in enumerate(zip(index, rows, strict=True)):
            row = torch.tensor(r, dtype=torch.long)
            input_ids[j, : len(r)] = row
            mask[j, : len(r)] = 1
            start = encoded.targets.prompt_lengths[i]
            labels[j, start : len(r)] = row[start:]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position, the NLL of the next token and whether it counts (``(batch, length - 1)`` each)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE
        nll = logits.new_zeros(valid.shape, dtype=torch.float32)
        # only the response positions go through the softmax (a (batch, length, vocab) one is large for LLMs)
        nll[valid] = torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid], reduction="none")
        return nll, valid

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nll, valid = self.token_nll(model, batch)
        per_example = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
        return per_example.mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, encoded: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
        n = len(encoded)
        if n == 0:
            nan = float("nan")
            return {"loss": nan, "perplexity": nan, "exact_match": nan, "rougeL": nan, "examples": 0}
        was_training = model.training
        model.eval()
        try:
            order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))
            total, tokens = 0.0, 0
            for start in range(0, n, batch_size):
                nll, valid = self.token_nll(model, self.collate(encoded, order[start : start + batch_size], pad_id))
                total += float((nll * valid).sum())
                tokens += int(valid.sum())
            loss = total / max(tokens, 1)
            metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
            if self.eval_generations > 0:
                k = min(self.eval_generations, n)
                answers = self.generate(model, encoded, list(range(k)), pad_id, batch_size)
                refs = encoded.targets.references[:k]
                metrics["exact_match"] = sum(map(exact_match, answers, refs)) / k
                metrics["rougeL"] = sum(map(rouge_l, answers, refs)) / k
        finally:
            model.train(was_training)
        return {**metrics, "examples": n}

    def generate(
        self, model: torch.nn.Module, encoded: Encoded, index: list[int], pad_id: int, batch_size: int = 16
    ) -> list[str]:
        """Greedy answers (decoded, special tokens removed, stripped) to the prompts of the examples at ``index``."""
        tokenizer = encoded.targets.tokenizer
        prompts = [encoded.input_ids[i][: encoded.targets.prompt_lengths[i]] for i in index]
        return generate_answers(model, tokenizer, prompts, pad_id, self.max_new_tokens, batch_size)


def stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for value in eos if isinstance(eos, list | tuple) else [eos]:
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    max_new_tokens: int,
    stop: list[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations of the token-id ``prompts`` (batched, left-padded; each ends after its first ``stop``
    token, which it keeps, or after ``max_new_tokens``)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=stop)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in generated[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:end])
    return out


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to the token-id ``prompts`` (:func:`generate_ids`), decoded without special tokens."""
    answers = generate_ids(model, prompts, pad_id, max_new_tokens, stop_ids(model, tokenizer), batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
