"""Batches of examples -> tensors for Hugging Face encoder models (the head path).

- classification / regression: `tokenizer(text_a, text_b)` (pairs where the task has them),
  truncated to `max_length`, padded to the longest in the batch; `labels` long / float.
- multiple choice: one (first, choice) pair per choice, giving `input_ids` etc. of shape
  [batch, num_choices, length]; for COPA the first segment is the premise joined to
  "because" (question "cause") or "so" (question "effect"), and the choice starts lower case.
- generation tasks have no encoder collator (they need a decoder's prompt path).

Truncation is counted: the first truncating batch logs a warning, and `num_truncated` /
`num_sequences` keep the running totals.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gem.data.tasks import DataError, TaskData

log = logging.getLogger(__name__)

CONNECTIVES = {"cause": "because", "effect": "so"}


def copa_first_segment(premise: str, question: str | None) -> str:
    """"The man fell." + cause -> "The man fell because" (unknown question: the premise)."""
    connective = CONNECTIVES.get(str(question).lower()) if question is not None else None
    if connective is None:
        return premise
    return f"{premise.strip().rstrip('.!?')} {connective}"


def lower_first(text: str) -> str:
    """Lower-case a sentence's first letter unless it is a lone "I" or an acronym."""
    text = text.strip()
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


class EncoderCollator:
    def __init__(self, tokenizer: Any, task: TaskData, max_length: int):
        if task.kind == "generation":
            raise DataError(f"task {task.name} is a generation task: it has no encoder collator "
                            f"(use the decoder prompt path)")
        self.tokenizer = tokenizer
        self.kind = task.kind
        self.task_name = task.name
        self.max_length = int(max_length)
        self.num_truncated = 0
        self.num_sequences = 0
        self._warned = False

    def _encode(self, first: list[str], second: list[str] | None) -> dict[str, torch.Tensor]:
        lengths = self.tokenizer(first, second, truncation=False, padding=False, verbose=False)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in lengths)
        self.num_sequences += len(lengths)
        if truncated:
            self.num_truncated += truncated
            if not self._warned:
                self._warned = True
                log.warning("%s: %d of %d sequences in a batch exceed max_length=%d and are truncated "
                            "(warned once; the collator's num_truncated keeps the total)",
                            self.task_name, truncated, len(lengths), self.max_length)
        return self.tokenizer(first, second, truncation=True, max_length=self.max_length,
                              padding="longest", return_tensors="pt")

    def length(self, example: dict) -> int:
        """Tokens of the example's longest row (for multiple choice: over its choices), capped at max_length."""
        if self.kind == "multiple_choice":
            question = example.get("question")
            head = copa_first_segment(example["text_a"], question) if question is not None else example["text_a"]
            pairs = [(head, lower_first(c) if question in CONNECTIVES else c) for c in example["choices"]]
        else:
            pairs = [(example["text_a"], example.get("text_b"))]
        ids = [self.tokenizer(first, second, truncation=False, verbose=False)["input_ids"] for first, second in pairs]
        return min(max(len(row) for row in ids), self.max_length)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "multiple_choice":
            return self._multiple_choice(batch)
        first = [ex["text_a"] for ex in batch]
        second = None
        if any(ex.get("text_b") is not None for ex in batch):
            second = [ex.get("text_b") or "" for ex in batch]
        out = dict(self._encode(first, second))
        dtype = torch.float if self.kind == "regression" else torch.long
        out["labels"] = torch.tensor([ex["label"] for ex in batch], dtype=dtype)
        return out

    def _multiple_choice(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        num_choices = len(batch[0]["choices"])
        if any(len(ex["choices"]) != num_choices for ex in batch):
            raise DataError(f"{self.task_name}: examples in one batch have different numbers of choices")
        first, second = [], []
        for ex in batch:
            question = ex.get("question")
            head = copa_first_segment(ex["text_a"], question) if question is not None else ex["text_a"]
            for choice in ex["choices"]:
                first.append(head)
                second.append(lower_first(choice) if question in CONNECTIVES else choice)
        flat = self._encode(first, second)
        out = {key: value.view(len(batch), num_choices, -1) for key, value in flat.items()}
        out["labels"] = torch.tensor([ex["label"] for ex in batch], dtype=torch.long)
        return out


def encoder_collator(tokenizer: Any, task: TaskData, max_length: int) -> EncoderCollator:
    """A collate_fn for a DataLoader over `task`'s examples (see the module docstring)."""
    return EncoderCollator(tokenizer, task, max_length)
