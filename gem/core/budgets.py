"""Budgets: how many entries K the whole model tunes, and how K splits over matrices.

Every splitting function returns ``{name: k_l}`` in the scores' key order, with
``sum(k_l) <= K`` and ``k_l`` never above the matrix's number of selectable entries
(scores that are neither NaN nor ``-inf``; see ``gem.core.scores``). Matrices with no
selectable entry (excluded, NaN/inf gradient) always get 0.

Per-matrix statistics (norm, entropy) are computed in float64: they are scalars, and
float64 keeps ``||r||_2`` from overflowing when zero weights make ``r = |G| / 1e-8`` huge.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Mapping

import torch
from torch import Tensor

from gem.core.scores import sanitised_flat, selectable_count

ENTROPY_EPS = 1e-8


# --- the total budget ---------------------------------------------------------------
def total_budget(density: float, num_model_parameters: int, num_eligible_entries: int | None = None) -> int:
    """``K = floor(density * N_model)``, N_model counting every parameter of the model.

    The product is taken on the decimal written in the config (``Decimal(repr(density))``)
    so that e.g. 0.29 * 100 gives 29, not the 28 that binary floating point would.
    Raises ``ValueError`` for a density outside (0, 1), for K < 1, and (when
    ``num_eligible_entries`` is given) for K larger than the entries that can be tuned.
    """
    try:
        density = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"density must be a number strictly between 0 and 1, got {density!r}") from None
    if not 0 < density < 1:
        raise ValueError(f"density must lie strictly between 0 and 1 (0.001 = 0.1% of the model), got {density!r}")
    if num_model_parameters < 1:
        raise ValueError(f"num_model_parameters must be positive, got {num_model_parameters}")
    budget = int(math.floor(Decimal(repr(density)) * int(num_model_parameters)))
    if budget < 1:
        raise ValueError(
            f"density {density} of {num_model_parameters} parameters gives a budget K = {budget} < 1 entry; "
            f"raise the density to at least {1 / num_model_parameters:.3g}"
        )
    if num_eligible_entries is not None and budget > num_eligible_entries:
        raise ValueError(
            f"budget K = {budget} (density {density} of {num_model_parameters} parameters) exceeds the "
            f"{num_eligible_entries} entries of the eligible matrices; lower the density or add target modules"
        )
    return budget


# --- entropy-guided allocation statistics ---------------------------------------------
def _nonnegative_float64(scores: Tensor) -> Tensor:
    r = scores.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(r)
    if bool((r[finite] < 0).any()):
        raise ValueError("entropy-guided allocation needs non-negative scores (e.g. |G|/(|W0|+eps)); "
                         "negative scores such as PaFi's -|W0| go with uniform or global budgets")
    return r


def _norm_and_entropy(scores: Tensor) -> tuple[float, float]:
    r = _nonnegative_float64(scores)
    if not bool(torch.isfinite(r).all()):
        return float("nan"), float("nan")
    total = r.sum()
    if total == 0:
        return 0.0, 0.0
    p = r / total
    return float(torch.linalg.vector_norm(r)), float(-(p * torch.log(p + ENTROPY_EPS)).sum())


def matrix_entropy(scores: Tensor) -> float:
    """``H = -sum(p * log(p + 1e-8))`` with ``p = r / sum(r)``, exactly as in the authors' code.

    High when importance is spread over many entries, near 0 when it sits on one.
    An all-zero ``r`` has no distribution; it is defined to have entropy 0 (so its
    allocation score is 0, not NaN). Any NaN/inf entry gives NaN (the matrix gets no budget).
    """
    return _norm_and_entropy(scores)[1]


def vector_norm(scores: Tensor) -> float:
    """``||r||_2`` in float64 (NaN if any entry is NaN/inf)."""
    return _norm_and_entropy(scores)[0]


def entropy_allocation_score(scores: Tensor) -> float:
    """GEM's matrix score ``s_l = ||r||_2 * H(r)``: strong *and* spread-out importance earns
    budget. 0 for an all-zero ``r``; NaN when ``r`` holds NaN/inf."""
    norm, entropy = _norm_and_entropy(scores)
    return norm * entropy


# --- splitting K --------------------------------------------------------------------
def _capacities(scores: Mapping[str, Tensor | int]) -> dict[str, int]:
    return {name: (int(s) if isinstance(s, int) else selectable_count(s)) for name, s in scores.items()}


def _check_budget(K: int, capacities: Mapping[str, int], min_per_matrix: int) -> None:
    if K < 0:
        raise ValueError(f"budget K must be non-negative, got {K}")
    if min_per_matrix < 0:
        raise ValueError(f"min_per_matrix must be non-negative, got {min_per_matrix}")
    available = sum(capacities.values())
    if K > available:
        raise ValueError(f"budget K = {K} exceeds the {available} selectable entries of the {len(capacities)} "
                         f"eligible matrices; lower the density or add target modules")
    floors = sum(min(min_per_matrix, c) for c in capacities.values())
    if floors > K:
        raise ValueError(f"min_per_matrix = {min_per_matrix} over {len(capacities)} matrices needs {floors} "
                         f"entries but the budget is K = {K}; lower min_per_matrix or raise the density")


def _proportional_with_floors(K: int, weights: Mapping[str, float], floors: Mapping[str, int]) -> dict[str, int]:
    """``floor(R * w_l / sum w)`` over the unpinned matrices, where matrices whose share
    would fall below their floor are pinned at it and R is what the pinned leave.

    With all floors 0 this is plain ``floor(K * w_l / sum w)``, computed in exact rational
    arithmetic on the float64 weights, so equal weights split K exactly (no 4.999... -> 4).
    Pinning only ever grows, so it ends in at most L rounds; the sum never exceeds K.
    """
    exact = {n: Fraction(w) for n, w in weights.items()}
    pinned: set[str] = set()
    while True:
        remaining = K - sum(floors[n] for n in pinned)
        free = [n for n in weights if n not in pinned]
        total = sum((exact[n] for n in free), Fraction(0))
        shares = {n: (math.floor(remaining * exact[n] / total) if total > 0 else 0) for n in free}
        newly = {n for n, k in shares.items() if k < floors[n]}
        if not newly:
            return {n: (floors[n] if n in pinned else shares[n]) for n in weights}
        pinned |= newly


def entropy_guided_budgets(scores: Mapping[str, Tensor], K: int, min_per_matrix: int = 0) -> dict[str, int]:
    """GEM's allocation: ``k_l = floor(K * s_l / sum_m s_m)``, ``s_l = ||r_l||_2 * H(r_l)``.

    * Matrices whose ``s_l`` is NaN/inf (excluded or broken scores) get ``s_l = 0``, so no budget;
      so does an all-zero ``r`` (``H`` defined as 0). A slightly negative ``s_l`` (a one-hot
      ``r`` has ``H = -log(1 + 1e-8)``) is clamped to 0 so no share goes below 0.
    * ``k_l`` is capped at the matrix's selectable entries; what a cap cuts is *not*
      redistributed (the authors' code does not either; a cap binds only at densities far
      above the method's 0.1%). The floor of each share leaves up to L-1 entries unspent.
    * ``min_per_matrix`` (default 0): every matrix with selectable entries gets at least
      that many (at most its capacity); the entries come out of the other matrices'
      shares in proportion to their ``s_l`` (shares are recomputed over the rest).
    Raises ``ValueError`` if K exceeds all selectable entries, if the floors need more
    than K, or if no matrix has a positive score while K > the floors.
    """
    capacities = _capacities(scores)
    _check_budget(K, capacities, min_per_matrix)
    weights = {}
    for name, s in scores.items():
        value = entropy_allocation_score(s) if capacities[name] > 0 else 0.0
        # The +1e-8 inside the log makes H of a one-hot r about -1e-8: clamp at 0.
        weights[name] = max(value, 0.0) if math.isfinite(value) else 0.0
    floors = {n: min(min_per_matrix, c) for n, c in capacities.items()}
    if sum(weights.values()) <= 0 and K > sum(floors.values()):
        raise ValueError("no eligible matrix has a positive allocation score ||r||_2 * H(r) (all scores zero or "
                         "non-finite); the gradient pass produced no usable signal")
    budgets = _proportional_with_floors(K, weights, floors)
    return {n: min(k, capacities[n]) for n, k in budgets.items()}


def uniform_budgets(scores_or_sizes: Mapping[str, Tensor | int], K: int, min_per_matrix: int = 0) -> dict[str, int]:
    """``floor(K / L)`` per matrix, L counting the matrices with selectable entries
    (an excluded matrix gets 0 and does not dilute the others), capped at capacity with no
    redistribution. Accepts score tensors or plain entry counts. ``min_per_matrix`` only
    checks: a share below it raises ``ValueError``."""
    capacities = _capacities(scores_or_sizes)
    _check_budget(K, capacities, 0)
    live = [n for n, c in capacities.items() if c > 0]
    share = K // len(live) if live else 0
    if live and share < min_per_matrix:
        raise ValueError(f"uniform share floor(K / L) = floor({K} / {len(live)}) = {share} is below "
                         f"min_per_matrix = {min_per_matrix}")
    return {n: (min(share, c) if c > 0 else 0) for n, c in capacities.items()}


def global_topk_budgets(scores: Mapping[str, Tensor], K: int, min_per_matrix: int = 0) -> dict[str, int]:
    """Per-matrix counts of one global top-K over all entries (FISH mask, PaFi).

    Selecting each matrix's top ``k_l`` with ``gem.core.selection.top_k_flat_indices``
    then yields exactly the global top-K set. Ties at the K-th value go to the matrix
    that comes first in ``scores``' order, and within a matrix to the lower flat index.
    ``min_per_matrix``: each matrix's top ``min(min_per_matrix, capacity)`` entries are
    reserved first; the global top-(K - reserved) runs over everything else.

    Memory stays at about ``sum_l min(K, numel_l)`` values: per-matrix top-k values are
    merged, never the full concatenation of all scores.
    """
    capacities = _capacities(scores)
    _check_budget(K, capacities, min_per_matrix)
    floors = {n: min(min_per_matrix, c) for n, c in capacities.items()}
    rest = K - sum(floors.values())
    if rest == 0:
        return dict(floors)

    flats = {n: sanitised_flat(s) for n, s in scores.items()}
    # Values of each matrix's unreserved entries that could reach the global top `rest`.
    candidates = []
    for n, flat in flats.items():
        take = min(floors[n] + rest, capacities[n])
        if take > floors[n]:
            candidates.append(torch.topk(flat, take, sorted=True).values[floors[n]:])
    device = candidates[0].device
    merged = torch.cat([c.to(device) for c in candidates])  # cat promotes mixed dtypes
    threshold = float(torch.topk(merged, rest, sorted=True).values[-1])

    counts, ties = {}, {}
    for n, flat in flats.items():
        above = int((flat > threshold).sum())
        equal = int((flat == threshold).sum())
        # Reserved entries are the matrix's best: first those above the threshold, then ties.
        reserved_equal = min(max(floors[n] - above, 0), equal)
        counts[n] = max(above - floors[n], 0)
        ties[n] = equal - reserved_equal
    need = rest - sum(counts.values())
    for n in flats:
        take = min(need, ties[n])
        counts[n] += take
        need -= take
    return {n: floors[n] + counts[n] for n in flats}


# --- diagnostics ------------------------------------------------------------------------
# Budget rules by name (`method.budget`): fn(scores, K, min_per_matrix) -> entries per matrix.
BUDGET_RULES: dict[str, Callable[..., dict[str, int]]] = {
    "entropy": entropy_guided_budgets,
    "uniform": uniform_budgets,
    "global": global_topk_budgets,
}


def register_budget_rule(name: str, fn: Callable[..., dict[str, int]]) -> None:
    """Add a budget rule, usable as ``method.budget=<name>``.

    ``fn(scores, K, min_per_matrix)`` gets every eligible matrix's scores (``-inf`` marks an
    excluded entry) and returns how many entries each matrix selects; the sum must not
    exceed K and no count may exceed the matrix's selectable entries (checked at selection).
    """
    if name in BUDGET_RULES:
        raise ValueError(f"budget rule {name!r} already exists; pick another name")
    BUDGET_RULES[name] = fn


def split_budget(rule: str, scores: Mapping[str, Tensor], K: int, min_per_matrix: int = 0) -> dict[str, int]:
    """Entries per matrix from the budget rule named `rule`, checked: whole counts >= 0 for
    every matrix, summing to at most K; a ValueError names the rule and what it gave."""
    if rule not in BUDGET_RULES:
        raise ValueError(f"unknown budget rule {rule!r}; choose one of {sorted(BUDGET_RULES)} (a new rule: "
                         f"gem.core.budgets.register_budget_rule)")
    given = BUDGET_RULES[rule](scores, K, min_per_matrix)
    if not isinstance(given, Mapping):
        raise ValueError(f"budget rule {rule!r} returned {type(given).__name__}; it must return a dict "
                         f"{{matrix name: number of entries}}")
    counts = {}
    for name, count in given.items():
        if isinstance(count, Tensor) and count.numel() == 1:
            count = count.item()
        if isinstance(count, bool) or not (isinstance(count, numbers.Integral) or
                                           (isinstance(count, float) and count.is_integer())):
            raise ValueError(f"budget rule {rule!r} gave {name} the count {count!r}; counts must be whole numbers "
                             f"(round them down, e.g. K * share // total, so they sum to at most K)")
        counts[name] = int(count)
    spent = sum(counts.values())
    if set(counts) != set(scores) or spent > K or (counts and min(counts.values()) < 0):
        raise ValueError(f"budget rule {rule!r} gave {spent} entries over {len(counts)} matrices; it must give every "
                         f"one of the {len(scores)} eligible matrices a count >= 0, summing to at most K={K}")
    return {name: counts[name] for name in scores}


def allocation_table(scores: Mapping[str, Tensor], budgets: Mapping[str, int]) -> list[dict]:
    """One row per matrix for the allocation CSV / plot: name, numel, selectable, budget,
    density (budget / numel), r_norm, entropy, allocation_score. Statistics of matrices with
    negative scores (PaFi) are reported as NaN rather than raising."""
    rows = []
    for name, s in scores.items():
        try:
            r_norm, entropy = _norm_and_entropy(s)
        except ValueError:
            r_norm = entropy = float("nan")
        budget = int(budgets.get(name, 0))
        rows.append({
            "name": name,
            "numel": s.numel(),
            "selectable": selectable_count(s),
            "budget": budget,
            "density": budget / s.numel() if s.numel() else 0.0,
            "r_norm": r_norm,
            "entropy": entropy,
            "allocation_score": r_norm * entropy,
        })
    return rows
