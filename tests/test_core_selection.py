from __future__ import annotations

import time

import pytest
import torch

from gem.core.selection import indices_to_mask, select_masks, top_k_flat_indices, unsorted_threshold_indices

NAN, INF = float("nan"), float("inf")


def test_top_k_basic_sorted_ascending():
    idx = top_k_flat_indices(torch.tensor([0.1, 0.5, 0.3, 0.9]), 2)
    assert idx.dtype == torch.long and idx.tolist() == [1, 3]


def test_top_k_ties_lower_index_wins_and_2d_flat_indices():
    score = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert top_k_flat_indices(score, 2).tolist() == [1, 2]
    assert top_k_flat_indices(score, 4).tolist() == [0, 1, 2, 3]
    # 2-D: flat index into view(-1); row 1 holds the maxima.
    assert top_k_flat_indices(torch.tensor([[0.0, 1.0], [5.0, 5.0]]), 3).tolist() == [1, 2, 3]


def test_top_k_zero_and_negative():
    empty = top_k_flat_indices(torch.ones(3), 0)
    assert empty.dtype == torch.long and empty.numel() == 0
    with pytest.raises(ValueError):
        top_k_flat_indices(torch.ones(3), -1)


def test_top_k_never_selects_nan_or_minus_inf():
    score = torch.tensor([NAN, 1.0, -INF, 2.0, INF])
    assert top_k_flat_indices(score, 3).tolist() == [1, 3, 4]  # +inf ranks first
    with pytest.raises(ValueError, match="selectable"):
        top_k_flat_indices(score, 4)


def test_top_k_exact_count_matches_stable_sort_with_many_ties():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 10, (256, 256), generator=g).float()
    k = 1000
    idx = top_k_flat_indices(score, k)
    reference = torch.sort(torch.argsort(-score.view(-1), stable=True)[:k]).values
    assert idx.numel() == k and torch.equal(idx, reference)


def test_top_k_is_fast_on_a_large_matrix():
    score = torch.rand(2048, 2048, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    idx = top_k_flat_indices(score, 4194)  # 0.1% of the entries
    assert idx.numel() == 4194
    assert time.perf_counter() - start < 2.0


def test_select_masks():
    scores = {"q": torch.tensor([[3.0, 1.0], [2.0, 0.0]]), "v": torch.tensor([1.0, 2.0])}
    masks = select_masks(scores, {"q": 2})
    assert masks["q"].tolist() == [0, 2] and masks["v"].numel() == 0  # missing budget -> 0
    with pytest.raises(ValueError, match="no scores"):
        select_masks(scores, {"k": 1})


def test_indices_to_mask():
    mask = indices_to_mask(torch.tensor([0, 3]), (2, 2))
    assert mask.tolist() == [[True, False], [False, True]]


def test_unsorted_threshold_ties_change_the_count():
    # top-2 values of [3, 1, 1, 0] are {3, 1}: whichever comes last, r >= it keeps 1 or 3, never 2.
    idx = unsorted_threshold_indices(torch.tensor([3.0, 1.0, 1.0, 0.0]), 2)
    assert idx.numel() != 2
    assert unsorted_threshold_indices(torch.ones(3), 0).numel() == 0


def test_unsorted_threshold_when_last_value_is_not_the_minimum(monkeypatch):
    # Emulate a GPU-style unsorted topk: top-3 of [5, 3, 1, 0] returned as [5, 1, 3].
    # The authors' threshold is values[-1] = 3, so only 2 entries (not 3) are kept.
    real_topk = torch.topk

    def unsorted_topk(input, k, *args, sorted=True, **kwargs):
        values, indices = real_topk(input, k, *args, sorted=True, **kwargs)
        order = torch.tensor([0, 2, 1])
        return torch.return_types.topk((values[order], indices[order]))

    monkeypatch.setattr(torch, "topk", unsorted_topk)
    score = torch.tensor([5.0, 3.0, 1.0, 0.0])
    assert unsorted_threshold_indices(score, 3).tolist() == [0, 1]
    assert top_k_flat_indices(score, 3).tolist() == [0, 1, 2]  # the clean version is unaffected
