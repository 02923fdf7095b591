"""Selection: which entries of each matrix are tuned, given its scores and budget.

Masks are returned as sorted flat indices into ``weight.view(-1)`` (a LongTensor), which
is what a sparse-delta parametrisation and a compact optimizer state need; a dense
boolean mask is one ``index_fill`` away.

The clean selection takes exactly ``k`` entries with a deterministic order: larger score
first, and on equal scores the lower flat index. NaN and ``-inf`` scores are never picked.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from gem.core.scores import sanitised_flat, selectable_count


def top_k_flat_indices(score: Tensor, k: int) -> Tensor:
    """Exactly ``k`` flat indices of the largest scores, sorted ascending.

    Ties: the lower flat index wins. ``torch.topk`` leaves tie order unspecified, so it is
    used only to find the k-th largest value ``t``; every entry ``> t`` is taken, and the
    remaining slots go to the lowest-index entries ``== t``. Cost: one topk and two
    comparisons, no full sort. Raises ``ValueError`` when ``k`` exceeds the selectable
    (not NaN, not ``-inf``) entries; ``k = 0`` gives an empty tensor.
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    flat = sanitised_flat(score)
    available = selectable_count(flat)
    if k > available:
        raise ValueError(f"cannot select k = {k} entries: only {available} of {flat.numel()} scores are "
                         f"selectable (the rest are NaN or -inf, e.g. a matrix excluded for a NaN gradient)")
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = torch.nonzero(flat > threshold).reshape(-1)
    ties = torch.nonzero(flat == threshold).reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def select_masks(scores: Mapping[str, Tensor], budgets: Mapping[str, int]) -> dict[str, Tensor]:
    """``{name: top_k_flat_indices(scores[name], budgets[name])}``; a matrix missing from
    ``budgets`` gets 0 entries. A budget for an unknown matrix is an error."""
    unknown = set(budgets) - set(scores)
    if unknown:
        raise ValueError(f"budgets name matrices that have no scores: {sorted(unknown)[:5]}")
    return {name: top_k_flat_indices(s, int(budgets.get(name, 0))) for name, s in scores.items()}


def unsorted_threshold_indices(score: Tensor, k: int) -> Tensor:
    """The authors' selection, kept as an option for exact replication.

    Their code does ``values, _ = torch.topk(r.flatten(), k, sorted=False)``, takes
    ``threshold = values[-1]`` and keeps ``r >= threshold``. With ``sorted=False`` the last
    value need not be the k-th largest: when it is a larger one, fewer than ``k`` entries
    are kept; ties at the threshold add entries beyond ``k``. On CPU,
    ``torch.topk(sorted=False)`` often returns values sorted anyway, in which case only ties
    change the count; on GPU the order genuinely varies. No NaN handling beyond what
    ``>=`` gives (NaN is never ``>=``), and no tie-breaking: that is the point.
    Returns the sorted flat indices of the kept entries.
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    flat = score.detach().reshape(-1)
    values, _ = torch.topk(flat, k, sorted=False)
    threshold = values[-1]
    return torch.nonzero(flat >= threshold).reshape(-1)


def indices_to_mask(indices: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Dense boolean mask of ``shape`` that is True at the given flat indices."""
    mask = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.reshape(tuple(shape))
