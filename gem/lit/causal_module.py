"""The causal-LM path (the paper's decoder protocol, MeZO-style): prompts instead of a task head.

Batches come from `gem.data.causal_collate` (left-padded; prompts from `gem.data.prompts`).

- classification / multiple choice: each candidate's score is the MEAN log-likelihood of its
  tokens after the prompt; the training loss is the cross-entropy of these scores against
  the gold candidate; the prediction is the best-scoring candidate (metrics: acc, f1, mcc).
- generation (SQuAD, GSM8k, MBPP): training is the LM loss on the target tokens only
  (token-averaged over the batch); dev and test are scored from greedy generations
  (`generation.max_new_tokens`, cut at `generation.stop` strings): token F1 / EM for SQuAD,
  exact match of the final number for GSM8k, pass@1 of the generated code in the sandbox
  (`gem.sandbox.run_untrusted`) for MBPP. The LM loss on dev/test is logged as dev/loss; the
  test generations and their scores are written to <run dir>/generations_test.jsonl.

Best-dev-epoch selection, restoring that state before testing, and the optimizer are shared
with the encoder path (`gem.lit.module.BestEpochModule`); metrics are keyed "dev/<name>" and
"test/<name>" as there.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from gem.generation_metrics import gsm8k_exact_match, squad_exact_match, squad_f1, truncate_at_stop
from gem.lit.module import BestEpochModule
from gem.methods.base import Method
from gem.metrics import build_metrics

log = logging.getLogger(__name__)

GENERATION_DEFAULTS = {"max_new_tokens": 50, "stop": [], "sandbox_timeout_s": 10.0, "answer": "marker"}


# --------------------------------------------------------------------------- log-likelihoods


def _forward_parameters(model: nn.Module) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    return set(inspect.signature(base.forward).parameters)


def _last_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Float logits of the last `keep` positions of left-padded rows (position ids count real tokens)."""
    accepted = _forward_parameters(model)
    kwargs: dict[str, Any] = {}
    if "position_ids" in accepted:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.logits[:, -keep:].float()


def suffix_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token | prefix) over the scored tokens, number of scored tokens) per row.

    Rows are left-padded [N, T]; the scored tokens (`score_mask` 1) are a suffix of each row,
    so only the last k positions need logits (`logits_to_keep`, when the model accepts it).
    Position ids count real tokens only, so a padded row scores as it would unpadded.
    """
    length = input_ids.shape[1]
    scored = score_mask.bool()
    no_score = torch.full_like(scored[:, 0], length, dtype=torch.long)
    first = torch.where(scored.any(-1), scored.long().argmax(-1), no_score)
    keep = min(length, int(length - first.min().item()) + 1)
    logits = _last_logits(model, input_ids, attention_mask, keep)[:, :-1]   # position t predicts token t + 1
    targets = input_ids[:, length - keep + 1:]
    mask = score_mask[:, length - keep + 1:].to(logits.dtype)
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logp * mask).sum(-1), mask.sum(-1)


def _single_token_candidates(batch: dict) -> bool:
    """Whether every candidate is one token after the same prompt (then one forward per example suffices)."""
    ids, attention, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    if ids.shape[-1] < 2 or not bool((score.sum(-1) == 1).all()) or not bool((score[..., -1] == 1).all()):
        return False
    return torch.equal(ids[:, :1, :-1].expand_as(ids[..., :-1]), ids[..., :-1]) and \
        torch.equal(attention[:, :1].expand_as(attention), attention)


def candidate_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """[batch, num_candidates]: each candidate's mean token log-likelihood after its prompt.

    When all candidates are single tokens after a shared prompt (Yes/No, great/terrible), the
    prompt runs once per example and the candidates are read off its next-token distribution:
    the same numbers as scoring every prompt + candidate row, at 1/num_candidates the cost.
    """
    ids = batch["input_ids"]
    b, c, t = ids.shape
    if _single_token_candidates(batch):
        logits = _last_logits(model, ids[:, 0, :-1], batch["attention_mask"][:, 0, :-1], 1)[:, -1]
        return logits.gather(-1, ids[:, :, -1]) - logits.logsumexp(-1, keepdim=True)
    total, count = suffix_logprobs(model, ids.reshape(b * c, t), batch["attention_mask"].reshape(b * c, t),
                                   batch["score_mask"].reshape(b * c, t))
    return (total / count.clamp(min=1)).view(b, c)


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens of the batch (prompt tokens masked out)."""
    total, count = suffix_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["score_mask"])
    return -total.sum() / count.sum().clamp(min=1)


def prompt_and_answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The authors' gradient-pass loss on decoders: the plain LM loss over prompt + gold answer.

    Candidate batches keep each example's gold candidate row; generation batches already hold
    prompt + target. Every real token after the first is predicted (labels = input ids, padding
    masked), as `model(input_ids, labels=input_ids).loss` on the unpadded rows.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.dim() == 3:  # [batch, candidates, tokens]: the gold candidate's row
        rows = torch.arange(ids.shape[0], device=ids.device)
        ids, mask = ids[rows, batch["labels"]], mask[rows, batch["labels"]]
    score = mask.clone()
    score[torch.arange(ids.shape[0], device=ids.device), mask.long().argmax(-1)] = 0  # the first token has no prefix
    total, count = suffix_logprobs(model, ids, mask, score)
    return -total.sum() / count.sum().clamp(min=1)


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded and cut at the first stop string."""
    from transformers import GenerationConfig

    stop = [s for s in (stop or []) if s]
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              stop_strings=stop or None)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                         tokenizer=tokenizer if stop else None)
    texts = tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)
    return [truncate_at_stop(text, stop) for text in texts]


def extract_code(generation: str) -> str:
    """The code of an MBPP generation: the text itself, or the body of its first ``` block."""
    if "```" in generation:
        head, _, rest = generation.partition("```")
        if head.strip():
            return head
        body = rest.split("```", 1)[0]
        return body.split("\n", 1)[1] if body.startswith(("python\n", "py\n", "\n")) else body
    return generation


def generation_score(metric: str, task_name: str, generation: str, example: dict,
                     sandbox_timeout_s: float = 10.0, answer: str = "marker") -> float:
    """One example's score for `metric` (em, f1, pass@1) of a generation task."""
    raw = example.get("raw") or {}
    if metric == "pass@1":
        from gem.sandbox import run_untrusted

        tests = list(raw.get("test_list") or [])
        if not tests:
            raise ValueError(f"{task_name}: pass@1 needs the example's test_list (uid {example.get('uid')})")
        setup = "\n".join(raw.get("test_imports") or [])
        return float(run_untrusted(extract_code(generation), tests, setup=setup, timeout_s=sandbox_timeout_s).passed)
    if task_name == "gsm8k" and metric == "em":
        return gsm8k_exact_match(generation, example["target"], answer=answer)
    answers = (raw.get("answers") or {}).get("text") or ([example["target"]] if example.get("target") else [])
    if metric == "f1":
        return squad_f1(generation.strip(), answers)
    if metric == "em":
        return squad_exact_match(generation.strip(), answers)
    raise ValueError(f"metric {metric!r} is not defined for generation task {task_name}; use em, f1 or pass@1")


# --------------------------------------------------------------------------- the module


class CausalLMModule(BestEpochModule):
    def __init__(self, model: nn.Module, method: Method, *, task_name: str, task_kind: str,
                 metric_names: list[str], num_labels: int, optim: dict[str, Any], tokenizer: Any = None,
                 generation: dict | None = None):
        super().__init__(model, method, main_metric=metric_names[0], optim=optim)
        self.task_name = task_name
        self.task_kind = task_kind
        self.metric_names = list(metric_names)
        self.tokenizer = tokenizer
        self.generation = {**GENERATION_DEFAULTS, **(generation or {})}
        if isinstance(self.generation["stop"], str):
            self.generation["stop"] = [self.generation["stop"]]
        if self.generation["answer"] not in ("marker", "last_number"):  # checked now, not after an epoch
            raise ValueError(f"task.generation.answer={self.generation['answer']!r}; choose 'marker' (the number "
                             f"after ####, the spec) or 'last_number'")
        self.generative = task_kind == "generation"
        if self.generative:
            if tokenizer is None:
                raise ValueError(f"{task_name}: a generation task needs the tokenizer")
            self.dev_metrics = nn.ModuleDict({m: torchmetrics.MeanMetric() for m in self.metric_names})
            self.test_metrics = nn.ModuleDict({m: torchmetrics.MeanMetric() for m in self.metric_names})
        else:
            metrics = build_metrics(self.metric_names, "classification", num_labels)
            self.dev_metrics = metrics.clone(prefix="dev/")
            self.test_metrics = metrics.clone(prefix="test/")
        self.generations: dict[str, list[dict]] = {"dev": [], "test": []}  # last epoch's outputs

    def batch_loss(self, model: nn.Module, batch) -> torch.Tensor:
        if self.generative:
            return lm_loss(model, batch)
        return F.cross_entropy(candidate_scores(model, batch), batch["labels"])

    # --- evaluation ---------------------------------------------------------------------
    def _evaluate(self, batch, split: str) -> None:
        metrics = self.dev_metrics if split == "dev" else self.test_metrics
        size = self.batch_size_of(batch)
        if not self.generative:
            scores = candidate_scores(self.model, batch)
            metrics.update(scores.argmax(-1), batch["labels"])
            self.log(f"{split}/loss", F.cross_entropy(scores, batch["labels"]), on_epoch=True, batch_size=size)
            return
        self.log(f"{split}/loss", lm_loss(self.model, batch), on_epoch=True, batch_size=size)
        texts = greedy_generate(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"],
                                self.generation["max_new_tokens"], self.generation["stop"])
        for text, example in zip(texts, batch["examples"]):
            scores = {m: generation_score(m, self.task_name, text, example, float(self.generation["sandbox_timeout_s"]),
                                          str(self.generation["answer"])) for m in self.metric_names}
            for name, value in scores.items():
                metrics[name].update(value)
            self.generations[split].append({"uid": example["uid"], "generation": text, **scores})

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "dev")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _compute(self, split: str) -> dict[str, float]:
        metrics = self.dev_metrics if split == "dev" else self.test_metrics
        if self.generative:
            values = {f"{split}/{name}": float(metric.compute()) for name, metric in metrics.items()}
            for metric in metrics.values():
                metric.reset()
            for row in self.generations[split][:2]:
                log.info("%s %s: %r -> %s", split, row["uid"], row["generation"][:200],
                         {m: row[m] for m in self.metric_names})
        else:
            values = {k: float(v) for k, v in metrics.compute().items()}
            metrics.reset()
        return values

    def on_validation_epoch_start(self):
        self.generations["dev"] = []

    def on_test_epoch_start(self):
        self.generations["test"] = []

    def on_validation_epoch_end(self):
        self._dev_epoch_done(self._compute("dev"))

    def on_test_epoch_end(self):
        self._test_epoch_done(self._compute("test"))
        if self.generative and self.trainer.is_global_zero and self.trainer.default_root_dir:
            # What the model wrote, next to the run record: <run dir>/generations_test.jsonl
            path = Path(self.trainer.default_root_dir) / "generations_test.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as handle:
                for row in self.generations["test"]:
                    handle.write(json.dumps(row) + "\n")
