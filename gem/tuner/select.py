"""`select_entries`: GEM's selection before training, on any model and any iterable of batches.

The gradient pass (when the score needs one) -> a score per entry -> a budget per matrix ->
exact top-k per matrix. The result is written onto the config (`indices`, `budgets`, K, N and
the base's fingerprint), ready for `peft.get_peft_model(model, config)`; the returned
`Selection` reports what happened (for logs, records and allocation plots).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from gem.core import budgets as B
from gem.core.delta import fingerprint
from gem.core.gradient_pass import LossFn, accumulate_gradients, all_reduce_sums, batch_size, training_loss
from gem.core.scores import entry_scores
from gem.core.selection import select_masks, top_k_flat_indices, unsorted_threshold_indices
from gem.progress import Progress
from gem.tuner.config import GemConfig, GemConfigError
from gem.tuner.layer import is_conv1d

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """What `select_entries` did: K, entries per matrix, the gradient pass's size and time."""

    total_budget: int
    tuned: int
    budgets: dict[str, int]
    gradient_samples: int
    gradient_pass_s: float
    selection_math_s: float
    allocation: list[dict] = field(default_factory=list)
    ranks_with_identical_masks: int = 1


def natural_key(name: str) -> list:
    """`layers.10.q` sorts after `layers.2.q`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def target_layers(model: nn.Module, config: GemConfig) -> dict[str, nn.Module]:
    """The layers `config.target_modules` names (PEFT's matching rules), in natural order.

    Only nn.Linear and GPT-2's Conv1D can be tuned: any other matched type is refused by name,
    and target names that match nothing are an error listing the model's linear layers.
    """
    if isinstance(model, BaseTunerLayer) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise GemConfigError("the model already holds PEFT adapter layers; select entries on the plain base model, "
                             "before get_peft_model")
    found = {name: module for name, module in model.named_modules()
             if name and bool(check_target_module_exists(config, name))}
    wrong = {name: type(m).__name__ for name, m in found.items() if not (isinstance(m, nn.Linear) or is_conv1d(m))}
    if wrong:
        name, kind = next(iter(wrong.items()))
        raise GemConfigError(f"target module {name!r} is a {kind}; GEM tunes nn.Linear and GPT-2 Conv1D layers only "
                             f"({len(wrong)} such matches; narrow target_modules={config.target_modules!r})")
    names = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    unmatched = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)] \
        if not isinstance(config.target_modules, str) else ([] if found else names)
    if unmatched:  # every name must reach a layer: a typo never trains silently with fewer matrices
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) or is_conv1d(m)})
        raise GemConfigError(f"target modules {unmatched} match no linear layer of {type(model).__name__}; its "
                             f"linear layers are named {linears}. Set model.target_modules (or "
                             f"method.target_modules) to the right names")
    return {name: found[name] for name in sorted(found, key=natural_key)}


def select_entries(model: nn.Module, config: GemConfig, batches: Iterable[Mapping[str, Any]] | None = None,
                   loss_fn: LossFn | None = None, *, device: torch.device | None = None,
                   loss_scale: float = 1.0) -> Selection:
    """Choose the entries GEM tunes and store them on `config` (then `get_peft_model(model, config)`).

    `batches`: model-input dicts with labels (only the first `config.num_grad_samples` examples
    are used; not needed when the score uses no gradients); `loss_fn(model, batch)`: the loss
    when it is not `model(**batch).loss`. The model leaves as it came (weights, flags, mode).
    Under torch.distributed every rank passes its share of the batches; the sums are
    all-reduced, so every rank selects the same entries. `loss_scale`: a power of two the
    `loss_fn` multiplied its loss by (fp16 autocast, so small gradients do not underflow); the
    sums are divided by it again, exactly.
    """
    config.check_rules()
    rule = config.score_rule
    layers = target_layers(model, config)
    num_parameters = sum(p.numel() for p in model.parameters())
    weights = {name: module.weight for name, module in layers.items()}
    _total_budget(config, num_parameters, weights)  # an impossible density fails before the gradient pass

    start = time.perf_counter()
    grads, seen = None, 0
    if rule.needs_gradients:
        if batches is None:
            raise GemConfigError(f"score={config.score!r} needs a gradient pass: pass batches (model-input dicts "
                                 f"with labels) to select_entries")
        grads, seen = accumulate_gradients(
            model, _logged(_first_examples(batches, int(config.num_grad_samples)),
                           _expected_examples(batches, int(config.num_grad_samples))),
            weights, loss_fn=loss_fn or training_loss, squared_per_example=rule.squared_per_example, device=device,
            train_mode=config.gradient_pass_mode == "train")
        grads, seen = all_reduce_sums(grads, seen)
        if loss_scale != 1.0:
            grads = {name: g.div_(loss_scale ** (2 if rule.squared_per_example else 1)) for name, g in grads.items()}
        if seen == 0:
            raise GemConfigError("the gradient pass got no examples: `batches` is empty")
        if seen < int(config.num_grad_samples):
            log.info("num_grad_samples=%d but the batches hold %d examples; the gradient pass used all of them",
                     int(config.num_grad_samples), seen)
    gradient_pass_s = time.perf_counter() - start

    start = time.perf_counter()
    detached = {name: w.detach() for name, w in weights.items()}
    masks, budgets, K, allocation = masks_from_sums(config, detached, grads, seen, num_parameters)
    selection_math_s = time.perf_counter() - start

    ranks = masks_agree_across_ranks(masks)
    config.indices = {n: idx for n, idx in masks.items() if idx.numel()}
    config.budgets = {n: int(idx.numel()) for n, idx in masks.items()}
    config.total_budget, config.num_model_parameters = K, num_parameters
    config.base_fingerprint = fingerprint({n: detached[n] for n in config.indices})
    tuned = sum(config.budgets.values())
    log.info("GEM: %d entries selected of K=%d over %d matrices (%s score, %s budget; gradient pass %.1fs on %d "
             "examples)", tuned, K, len(masks), config.score, config.budget, gradient_pass_s, seen)
    if K - tuned > len(masks):
        log.warning("GEM: %d of K=%d entries selected: some matrices' shares exceeded their size (or their scores "
                    "were NaN) and the rest is not redistributed, as in the authors' code", tuned, K)
    elif tuned < K:
        log.info("GEM: %d fewer than K: each matrix's budget is rounded down to whole entries", K - tuned)
    return Selection(total_budget=K, tuned=tuned, budgets=dict(budgets), gradient_samples=seen,
                     gradient_pass_s=gradient_pass_s, selection_math_s=selection_math_s, allocation=allocation,
                     ranks_with_identical_masks=ranks)


def _total_budget(config: GemConfig, num_parameters: int, weights: Mapping[str, torch.Tensor]) -> int:
    """K = floor(density * N) for these target matrices (GemConfigError naming method.density)."""
    try:
        return B.total_budget(float(config.density), num_parameters, sum(w.numel() for w in weights.values()))
    except ValueError as error:
        raise GemConfigError(f"{error} (method.density)") from None


class Masks(NamedTuple):
    """What `masks_from_sums` chose: sorted flat indices and budget per matrix, K, the allocation rows."""

    indices: dict[str, torch.Tensor]
    budgets: dict[str, int]
    total_budget: int
    allocation: list[dict]


def masks_from_sums(config: GemConfig, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor] | None,
                    seen: int, num_parameters: int) -> Masks:
    """Scores -> budgets -> top-k per matrix, from the gradient pass's sums: `select_entries`' math.

    `weights`: W0 of the target matrices (natural order, as `target_layers`); `grads`: their
    summed gradients over `seen` examples (None for a score that needs none); `num_parameters`:
    N of K = floor(density * N). Apart from the gradient pass so that masks can be computed from
    sums made elsewhere (e.g. prefix sums of one pass, experiments/stability.py) by the same code.
    """
    K = _total_budget(config, num_parameters, weights)
    weights = {name: w.detach() for name, w in weights.items()}
    scores = entry_scores(config.score, grads, weights, eps=float(config.eps), num_samples=seen or None,
                          generator=torch.Generator(device="cpu").manual_seed(int(config.seed)))
    try:
        budgets = B.split_budget(config.budget, scores, K, int(config.min_per_matrix))
    except ValueError as error:
        raise GemConfigError(str(error)) from None
    if sum(budgets.values()) == 0:
        raise GemConfigError(f"no entry selected: density={config.density} gives K={K} entries for {len(scores)} "
                             f"target matrices, and the {config.budget!r} rule gave each of them 0 (budgets are "
                             f"rounded down). Raise method.density to at least {len(scores) / num_parameters:.2g} "
                             f"(K >= one entry per matrix) or target fewer matrices")
    if config.threshold == "unsorted":
        masks = {n: unsorted_threshold_indices(s, budgets[n]) if budgets[n] else top_k_flat_indices(s, 0)
                 for n, s in scores.items()}
    else:
        masks = select_masks(scores, budgets)
    return Masks(masks, dict(budgets), K, B.allocation_table(scores, budgets))


def _first_examples(batches: Iterable[Mapping[str, Any]], limit: int) -> Iterator[Mapping[str, Any]]:
    """The batches up to `limit` examples in all; the batch that crosses it is cut."""
    seen = 0
    for batch in batches:
        if seen >= limit:
            return
        size = batch_size(batch)
        if seen + size > limit:
            keep = limit - seen
            batch = {k: (v[:keep] if torch.is_tensor(v) and v.dim() and v.shape[0] == size else v)
                     for k, v in batch.items()}
            size = keep
        seen += size
        yield batch


def _expected_examples(batches: Iterable[Mapping[str, Any]], asked: int) -> int:
    """How many examples the pass will see: `asked`, or fewer where a DataLoader's sampler says so."""
    try:
        return min(asked, len(batches.sampler))  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return asked


def _logged(batches: Iterable[Mapping[str, Any]], total: int) -> Iterator[Mapping[str, Any]]:
    """Pass the batches through, logging the gradient pass's progress in examples (with time left)."""
    enabled = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
    with Progress(total, "GEM gradient pass", log, unit="examples", enabled=enabled) as tracker:
        for batch in batches:
            yield batch
            tracker.update(batch_size(batch))


def masks_agree_across_ranks(masks: Mapping[str, torch.Tensor]) -> int:
    """Under torch.distributed, verify every rank selected the same entries; the number of ranks.

    Each rank holds its own copy of the deltas and DDP averages their gradients, which is only
    meaningful when every rank tuned the same entries.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    # Per matrix: count and an order-sensitive checksum of the flat indices. The summary lives on
    # the masks' device: NCCL (multi-GPU DDP) cannot gather CPU tensors.
    device = next(iter(masks.values())).device if masks else torch.device("cpu")
    summary = torch.tensor([v for idx in masks.values() for v in
                            (idx.numel(), int((idx.cpu() * torch.arange(1, idx.numel() + 1)).sum()))],
                           dtype=torch.long, device=device)
    gathered = [torch.zeros_like(summary) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, summary)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("GEM selected different masks on different ranks; the gradient sums were not "
                           "all-reduced identically (check that every rank sees the same model and data)")
    return len(gathered)
