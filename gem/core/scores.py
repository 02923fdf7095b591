"""Entry scores: how much each entry of an eligible weight matrix deserves to be tuned.

Every score function returns a float32 tensor shaped like the weight; a larger score
means "select first". Selection (``gem.core.selection``) never picks an entry whose
score is ``-inf`` or NaN, which is how excluded matrices are expressed.

NaN / inf policy (one decision, used everywhere):

* A matrix whose gradient (or squared-gradient sum) holds any NaN or inf is
  *excluded*: its scores are all ``-inf``, so every budget function gives it 0 entries
  and it is reported by ``check_gradients`` and a logged warning. Partial repair (dropping
  only the bad entries) would hide a broken gradient pass, so we do not try it.
* If no matrix is left with a finite, non-zero gradient, ``check_gradients`` raises a
  ``ValueError``: the gradient pass produced nothing to rank by.

Scores are computed in float32 even for half-precision inputs: in fp16 ``|W0| + 1e-8``
rounds ``1e-8`` away, so a zero weight would give ``|G| / 0 = inf``; in float32 it gives
the finite ``|G| / 1e-8`` the method intends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-8


def gradient_to_weight_ratio(grad: Tensor, weight: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """GEM's scale-aware score ``|G| / (|W0| + eps)``: a large gradient on a small weight
    is a large relative change, so it ranks above the same gradient on a large weight."""
    if grad.shape != weight.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}")
    return grad.float().abs() / (weight.float().abs() + eps)


def gradient_magnitude(grad: Tensor) -> Tensor:
    """``|G|``: the ablation that ignores the weight's scale."""
    return grad.float().abs()


def fisher_score(squared_grad_sum: Tensor, num_samples: int) -> Tensor:
    """FISH mask (Sung et al. 2021): the mean over samples of the squared per-sample
    gradient, an estimate of the diagonal empirical Fisher. The caller accumulates
    ``sum_i g_i**2`` over ``num_samples`` per-sample gradients."""
    if num_samples < 1:
        raise ValueError(f"fisher_score needs num_samples >= 1, got {num_samples}")
    return squared_grad_sum.float() / num_samples


def smallest_weight_score(weight: Tensor) -> Tensor:
    """PaFi (Liao et al. 2023): tune the entries of smallest magnitude, no data needed.
    The score is ``-|W0|`` so that "largest score first" means "smallest ``|W0|`` first".
    Being negative, it is meant for global or uniform budgets, not entropy-guided ones."""
    return -weight.float().abs()


def random_score(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Uniform random scores in [0, 1): random masking (Xu & Zhang 2024). Pass a seeded
    ``generator`` for a reproducible mask.

    The numbers are drawn on the generator's device and then moved to ``device``, so a CPU
    generator gives the same mask whether the model sits on the CPU or a GPU.
    """
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return scores.to(device) if device is not None else scores


@dataclass(frozen=True)
class ScoreRule:
    """One entry of the score registry: how to score one matrix, and what the score needs.

    ``fn(grad, weight, context)`` returns a score per entry, shaped like the weight. ``grad`` is
    the gradient pass's sum for the matrix (its sum of squared per-example gradients when
    ``squared_per_example``), None when the rule needs no gradients; ``weight`` is W0, None
    when the rule needs no weights; ``context`` holds ``eps``, ``num_samples`` and a seeded
    ``generator``. ``checked``: the output is validated (shape, finiteness) with the rule's
    name in the error, as for every rule a user registers.
    """

    fn: Callable[[Tensor | None, Tensor | None, "ScoreContext"], Tensor]
    needs_gradients: bool
    needs_weights: bool
    squared_per_example: bool = False
    checked: bool = False


@dataclass
class ScoreContext:
    eps: float = DEFAULT_EPS
    num_samples: int | None = None
    generator: torch.Generator | None = None


def _fisher(grad: Tensor, weight: Tensor | None, context: ScoreContext) -> Tensor:
    if context.num_samples is None:
        raise ValueError("score kind 'fisher' needs num_samples")
    return fisher_score(grad, context.num_samples)


# The one score registry: built-in kinds and the ones `register_score` adds.
SCORES: dict[str, ScoreRule] = {
    "ratio": ScoreRule(lambda g, w, c: gradient_to_weight_ratio(g, w, c.eps), needs_gradients=True, needs_weights=True),
    "gradient": ScoreRule(lambda g, w, c: gradient_magnitude(g), needs_gradients=True, needs_weights=False),
    "fisher": ScoreRule(_fisher, needs_gradients=True, needs_weights=False, squared_per_example=True),
    "smallest_weight": ScoreRule(lambda g, w, c: smallest_weight_score(w), needs_gradients=False, needs_weights=True),
    # the weight is passed for its shape and device; the draw depends on neither its values nor the data
    "random": ScoreRule(lambda g, w, c: random_score(w.shape, c.generator, device=w.device), needs_gradients=False,
                        needs_weights=True),
}


def score_rule(kind: str) -> ScoreRule:
    """The registry entry of a score kind, or a ValueError listing the known kinds."""
    if kind not in SCORES:
        raise ValueError(f"unknown score kind {kind!r}; choose one of {sorted(SCORES)} (a new score: "
                         f"gem.core.scores.register_score)")
    return SCORES[kind]


def register_score(kind: str, fn: Callable[[Tensor | None, Tensor | None], Tensor], *,
                   needs_gradients: bool = True, needs_weights: bool = True, squared_per_example: bool = False) -> None:
    """Add a selection score, usable as ``score=<kind>`` (``method.score=<kind>`` in run.py).

    ``fn(G, W0)`` gets one matrix's summed gradient of the gradient pass (None unless
    ``needs_gradients``; with ``squared_per_example`` the sum of squared per-example gradients,
    one backward per example) and its pre-trained weight (None unless ``needs_weights``) and
    returns a score per entry (larger = selected first). Matrices with NaN/inf gradients are
    excluded before ``fn`` sees them, as for the built-in scores.
    """
    if kind in SCORES:
        raise ValueError(f"score kind {kind!r} already exists; pick another name")
    if not (needs_gradients or needs_weights):
        raise ValueError(f"score kind {kind!r} must use the gradients, the weights or both")
    if squared_per_example and not needs_gradients:
        raise ValueError(f"score kind {kind!r}: squared_per_example needs needs_gradients=True")
    SCORES[kind] = ScoreRule(lambda g, w, c: fn(g, w), needs_gradients=needs_gradients, needs_weights=needs_weights,
                             squared_per_example=squared_per_example, checked=True)


def check_gradients(grads: Mapping[str, Tensor]) -> list[str]:
    """Names of the matrices whose gradient holds NaN or inf (to be excluded).

    Raises ``ValueError`` when no matrix has a finite gradient with at least one non-zero
    entry, since every score would then be meaningless (all-zero ratios rank nothing).
    """
    if not grads:
        raise ValueError("check_gradients: no gradients given (no eligible matrices?)")
    bad: list[str] = []
    usable = 0
    for name, grad in grads.items():
        if not bool(torch.isfinite(grad).all()):
            bad.append(name)
        elif bool((grad != 0).any()):
            usable += 1
    if usable == 0:
        raise ValueError(
            "the gradient pass produced no usable signal: "
            f"{len(bad)} of {len(grads)} eligible matrices have NaN/inf gradients and the rest are all zero"
            + (f" (non-finite: {bad[:5]}{' ...' if len(bad) > 5 else ''})" if bad else "")
            + "; check the loss (is it finite and does it depend on the eligible weights?), "
            "the learning data (labels masked out? empty batches?) and the precision (fp16 overflow?)"
        )
    return bad


def entry_scores(
    kind: str,
    grads: Mapping[str, Tensor] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    *,
    eps: float = DEFAULT_EPS,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Scores for every eligible matrix, keyed like the inputs (order kept).

    ``kind`` names an entry of ``SCORES``, which says what it needs: ``grads`` (the gradient
    pass's sums G; for ``fisher`` the sums of squared per-example gradients, with
    ``num_samples``) and/or ``weights`` (W0). ``random`` draws in key order from ``generator``.

    For rules that need gradients, matrices with a NaN/inf gradient get all ``-inf`` scores (see
    the module docstring) and a warning is logged; ``ValueError`` when none is usable.
    """
    rule = score_rule(kind)
    if rule.needs_gradients and grads is None:
        raise ValueError(f"score kind {kind!r} needs the gradients")
    if rule.needs_weights and weights is None:
        raise ValueError(f"score kind {kind!r} needs the pre-trained weights")
    if grads is not None and weights is not None and list(grads) != list(weights):
        missing = set(grads) ^ set(weights)
        raise ValueError(f"gradients and weights must have the same keys in the same order; differing: {sorted(missing)[:5]}")
    names = list(grads if rule.needs_gradients else weights)
    bad: set[str] = set()
    if rule.needs_gradients:
        bad = set(check_gradients(grads))
        if bad:
            logger.warning("excluding %d of %d matrices with NaN/inf gradients (budget 0): %s",
                           len(bad), len(grads), sorted(bad))
    context = ScoreContext(eps=eps, num_samples=num_samples, generator=generator)
    scores: dict[str, Tensor] = {}
    for name in names:
        grad = grads[name] if rule.needs_gradients else None
        weight = weights[name] if rule.needs_weights else None
        if name in bad:
            scores[name] = torch.full(grad.shape, float("-inf"), dtype=torch.float32, device=grad.device)
            continue
        score = rule.fn(grad, weight, context)
        shape = (grad if grad is not None else weight).shape
        scores[name] = _checked(kind, score, shape) if rule.checked else score
    return scores


def _checked(kind: str, scores: Tensor, shape: torch.Size) -> Tensor:
    """A registered score's output: a finite tensor shaped like the weight, or an error naming the rule."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"score kind {kind!r} returned a {type(scores).__module__}.{type(scores).__name__}; it must "
                         f"return a torch.Tensor shaped like the weight, {tuple(shape)}")
    if scores.shape != shape:
        raise ValueError(f"score kind {kind!r} returned shape {tuple(scores.shape)}; it must return a tensor shaped "
                         f"like the weight, {tuple(shape)}")
    if scores.is_complex() or not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum()) if not scores.is_complex() else scores.numel()
        raise ValueError(f"score kind {kind!r} returned {bad} NaN/inf (or complex) of {scores.numel()} entries; a "
                         f"score must be finite (matrices with NaN/inf gradients are excluded before it is called)")
    return scores.float()


def excluded_matrices(scores: Mapping[str, Tensor]) -> list[str]:
    """Names of matrices with no selectable entry (every score ``-inf`` or NaN)."""
    return [name for name, s in scores.items() if int(selectable_count(s)) == 0]


def sanitised_flat(score: Tensor) -> Tensor:
    """Flattened scores with NaN mapped to ``-inf`` (``torch.topk`` ranks NaN *highest*)."""
    flat = score.detach().reshape(-1)
    if flat.is_floating_point():
        flat = torch.where(torch.isnan(flat), torch.full_like(flat, float("-inf")), flat)
    return flat


def selectable_count(score: Tensor) -> int:
    """Entries selection may pick: neither NaN nor ``-inf`` (``+inf`` ranks first)."""
    return int((~torch.isnan(score) & (score != float("-inf"))).sum())
