"""Batches of examples -> tensors for causal LMs (the decoder prompt path; templates in `prompts`).

Every sequence is LEFT-padded (pad id, attention 0), so the scored tokens (a candidate or a
target) sit at the end of every row: the model only needs logits for the last few
positions, and generation continues every prompt from its last column.

- classification / multiple choice (candidate scoring): for each example one sequence per
  candidate = prompt tokens + candidate tokens, giving `input_ids`, `attention_mask` and
  `score_mask` of shape [batch, num_candidates, length]; `score_mask` is 1 on the candidate's
  tokens only (the prompt is masked out, as labels of -100 would be); `labels` [batch] is the
  gold candidate's index.
- generation: `input_ids` / `attention_mask` / `score_mask` [batch, length] hold prompt +
  target (+ eos) for the LM loss on the target tokens only; `prompt_ids` /
  `prompt_attention_mask` hold the prompt alone for greedy generation; `examples` keeps the
  example dicts for scoring the generations.

Prompt and candidate are tokenized separately (the prompt with the tokenizer's special
tokens, the candidate without), so the scored tokens are exactly the candidate's. Sequences
longer than `max_length` lose prompt tokens from the LEFT (a leading BOS is kept); the
candidate or target is kept whole (a target longer than the whole budget is cut on the right).
For generation the prompt alone gets `max_length - max_new_tokens` tokens. Truncation is
counted (`num_truncated` / `num_sequences`) and warned about once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gem.data.prompts import Prompt, render
from gem.data.tasks import DataError, TaskData

log = logging.getLogger(__name__)


def left_pad(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    """A [len(rows), longest] long tensor, each row right-aligned after `pad_value`s."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
    return out


class CausalCollator:
    def __init__(self, tokenizer: Any, task: TaskData, max_length: int, max_new_tokens: int = 0,
                 append_eos: bool = True):
        if task.kind == "regression":
            raise DataError(f"task {task.name} is a regression task: the decoder prompt path scores "
                            f"candidates or generates text; use an encoder model")
        self.tokenizer = tokenizer
        self.kind = task.kind
        self.task_name = task.name
        self.max_length = int(max_length)
        self.max_new_tokens = int(max_new_tokens)
        if self.kind == "generation" and self.max_new_tokens >= self.max_length:
            raise DataError(f"{task.name}: max_new_tokens={max_new_tokens} leaves no room for the prompt "
                            f"within max_length={max_length}")
        self.append_eos = append_eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.num_truncated = 0
        self.num_sequences = 0
        self._warned = False

    # --- tokens -------------------------------------------------------------------------
    def _prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _piece_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit(self, prompt: list[int], budget: int) -> list[int]:
        """The prompt cut from the left to at most `budget` tokens (a leading BOS stays)."""
        if len(prompt) <= budget:
            return prompt
        if budget <= 0:
            return []
        keep_bos = self.bos_id is not None and prompt[0] == self.bos_id and budget > 1
        return [prompt[0]] + prompt[len(prompt) - budget + 1:] if keep_bos else prompt[len(prompt) - budget:]

    def _count(self, truncated: bool, length: int) -> None:
        self.num_sequences += 1
        if not truncated:
            return
        self.num_truncated += 1
        if not self._warned:
            self._warned = True
            log.warning("%s: a prompt of %d tokens is cut from the left to fit max_length=%d (warned once; "
                        "the collator's num_truncated keeps the total)", self.task_name, length, self.max_length)

    def length(self, example: dict) -> int:
        """The example's sort key for batching: its longest row (prompt + longest candidate), or
        for generation its prompt alone (what greedy decoding runs over), capped at max_length."""
        prompt = render(self.task_name, example)
        if self.kind == "generation":
            return min(len(self._prompt_ids(prompt.text)), self.max_length - self.max_new_tokens)
        tail = max((len(self._piece_ids(piece)) for piece in prompt.candidates), default=0)
        return min(len(self._prompt_ids(prompt.text)) + tail, self.max_length)

    # --- batches ------------------------------------------------------------------------
    def __call__(self, batch: list[dict]) -> dict[str, Any]:
        prompts = [render(self.task_name, ex) for ex in batch]
        if self.kind == "generation":
            return self._generation(batch, prompts)
        return self._candidates(prompts)

    def _candidates(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        num = len(prompts[0].candidates)
        if any(len(p.candidates) != num for p in prompts):
            raise DataError(f"{self.task_name}: examples in one batch have different numbers of candidates")
        rows, scored = [], []
        for p in prompts:
            prompt = self._prompt_ids(p.text)
            for candidate in p.candidates:
                cand = self._piece_ids(candidate)
                if not cand:
                    raise DataError(f"{self.task_name}: candidate {candidate!r} tokenizes to nothing")
                cand = cand[: self.max_length - 1]
                head = self._fit(prompt, self.max_length - len(cand))
                self._count(len(head) < len(prompt), len(prompt))
                rows.append(head + cand)
                scored.append([0] * len(head) + [1] * len(cand))
        ids = left_pad(rows, self.pad_id)
        shape = (len(prompts), num, ids.shape[-1])
        return {"input_ids": ids.view(shape),
                "attention_mask": left_pad([[1] * len(r) for r in rows], 0).view(shape),
                "score_mask": left_pad(scored, 0).view(shape),
                "labels": torch.tensor([p.label for p in prompts], dtype=torch.long)}

    def _generation(self, batch: list[dict], prompts: list[Prompt]) -> dict[str, Any]:
        rows, scored, prompt_rows = [], [], []
        eos = [self.tokenizer.eos_token_id] if self.append_eos and self.tokenizer.eos_token_id is not None else []
        for p in prompts:
            prompt = self._prompt_ids(p.text)
            target = (self._piece_ids(p.target) if p.target else []) + eos
            target = target[: self.max_length - 1]
            head = self._fit(prompt, self.max_length - len(target))
            alone = self._fit(prompt, self.max_length - self.max_new_tokens)
            self._count(len(head) < len(prompt) or len(alone) < len(prompt), len(prompt))
            rows.append(head + target)
            scored.append([0] * len(head) + [1] * len(target))
            prompt_rows.append(alone)
        return {"input_ids": left_pad(rows, self.pad_id),
                "attention_mask": left_pad([[1] * len(r) for r in rows], 0),
                "score_mask": left_pad(scored, 0),
                "prompt_ids": left_pad(prompt_rows, self.pad_id),
                "prompt_attention_mask": left_pad([[1] * len(r) for r in prompt_rows], 0),
                "examples": list(batch)}


def causal_collator(tokenizer: Any, task: TaskData, max_length: int, max_new_tokens: int = 0) -> CausalCollator:
    """A collate_fn for a DataLoader over `task`'s examples on a causal LM (see the module docstring)."""
    return CausalCollator(tokenizer, task, max_length, max_new_tokens)
