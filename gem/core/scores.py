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


# Per-matrix score functions by kind, for callers that want one directly.
SCORES: dict[str, Callable[..., Tensor]] = {
    "ratio": gradient_to_weight_ratio,
    "gradient": gradient_magnitude,
    "fisher": fisher_score,
    "smallest_weight": smallest_weight_score,
    "random": random_score,
}
# Kinds that need the gradient pass (registered rules add themselves).
GRADIENT_KINDS: set[str] = {"ratio", "gradient", "fisher"}
# Rules added with `register_score`: kind -> (fn(G or None, W0 or None) -> scores, needs G, needs W0).
_REGISTERED: dict[str, tuple[Callable[[Tensor | None, Tensor | None], Tensor], bool, bool]] = {}


def register_score(kind: str, fn: Callable[[Tensor | None, Tensor | None], Tensor], *,
                   needs_gradients: bool = True, needs_weights: bool = True) -> None:
    """Add a selection score, usable as ``method.score=<kind>``.

    ``fn(G, W0)`` gets one matrix's summed gradient of the gradient pass (None unless
    ``needs_gradients``) and its pre-trained weight (None unless ``needs_weights``) and
    returns a score per entry (larger = selected first). Matrices with NaN/inf gradients are
    excluded before ``fn`` sees them, as for the built-in scores.
    """
    if kind in SCORES:
        raise ValueError(f"score kind {kind!r} already exists; pick another name")
    if not (needs_gradients or needs_weights):
        raise ValueError(f"score kind {kind!r} must use the gradients, the weights or both")
    SCORES[kind] = fn
    _REGISTERED[kind] = (fn, needs_gradients, needs_weights)
    if needs_gradients:
        GRADIENT_KINDS.add(kind)


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

    ``kind`` is one of ``SCORES``:

    * ``"ratio"``: needs ``grads`` (summed signed gradients G) and ``weights`` (W0).
    * ``"gradient"``: needs ``grads``.
    * ``"fisher"``: needs ``grads`` holding the *sum of squared per-sample gradients* and
      ``num_samples``.
    * ``"smallest_weight"``: needs ``weights``.
    * ``"random"``: needs ``weights`` (or ``grads``) for the shapes; draws in key order.

    For the gradient kinds, matrices with a NaN/inf gradient get all ``-inf`` scores (see
    the module docstring) and a warning is logged; ``ValueError`` when none is usable.
    """
    if kind not in SCORES:
        raise ValueError(f"unknown score kind {kind!r}; choose one of {sorted(SCORES)}")
    if kind in GRADIENT_KINDS and grads is None:
        raise ValueError(f"score kind {kind!r} needs the gradients")
    if (kind in ("ratio", "smallest_weight") or (kind in _REGISTERED and _REGISTERED[kind][2])) and weights is None:
        raise ValueError(f"score kind {kind!r} needs the pre-trained weights")
    if grads is not None and weights is not None and list(grads) != list(weights):
        missing = set(grads) ^ set(weights)
        raise ValueError(f"gradients and weights must have the same keys in the same order; differing: {sorted(missing)[:5]}")

    if kind == "smallest_weight":
        return {name: smallest_weight_score(w) for name, w in weights.items()}
    if kind in _REGISTERED and kind not in GRADIENT_KINDS:  # a registered weight-only score
        return {name: _checked(kind, _REGISTERED[kind][0](None, w), w.shape) for name, w in weights.items()}
    if kind == "random":
        shapes = weights if weights is not None else grads
        if shapes is None:
            raise ValueError("score kind 'random' needs weights or gradients for the shapes")
        return {name: random_score(t.shape, generator, device=t.device) for name, t in shapes.items()}

    bad = set(check_gradients(grads))
    if bad:
        logger.warning("excluding %d of %d matrices with NaN/inf gradients (budget 0): %s",
                       len(bad), len(grads), sorted(bad))
    scores: dict[str, Tensor] = {}
    for name, grad in grads.items():
        if name in bad:
            scores[name] = torch.full(grad.shape, float("-inf"), dtype=torch.float32, device=grad.device)
        elif kind == "ratio":
            scores[name] = gradient_to_weight_ratio(grad, weights[name], eps)
        elif kind == "gradient":
            scores[name] = gradient_magnitude(grad)
        elif kind in _REGISTERED:
            fn, _, needs_weights = _REGISTERED[kind]
            scores[name] = _checked(kind, fn(grad, weights[name] if needs_weights else None), grad.shape)
        else:
            if num_samples is None:
                raise ValueError("score kind 'fisher' needs num_samples")
            scores[name] = fisher_score(grad, num_samples)
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


def selectable_count(score: Tensor) -> int:
    """Entries selection may pick: neither NaN nor ``-inf`` (``+inf`` ranks first)."""
    return int((~torch.isnan(score) & (score != float("-inf"))).sum())
