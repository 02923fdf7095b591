from __future__ import annotations

import math

import pytest
import torch

from gem.core.budgets import (
    allocation_table,
    entropy_allocation_score,
    entropy_guided_budgets,
    global_topk_budgets,
    matrix_entropy,
    total_budget,
    uniform_budgets,
)
from gem.core.selection import select_masks

NAN, INF = float("nan"), float("inf")

# Two hand-computed matrices used throughout:
#   A: r = [1, 1, 1, 1]           ||r|| = 2, p = 1/4 each, H = ln 4 = 1.386294, s_A = 2.772589
#   B: r = [3, 4, 0, 0, 0, 0]     ||r|| = 5, p = [3/7, 4/7, 0...],
#                                 H = -(3/7 ln 3/7 + 4/7 ln 4/7) = 0.682908, s_B = 3.414539
#   (zeros contribute 0 * log(1e-8) = 0)
A = torch.ones(4)
B = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
S_A, S_B = 2 * math.log(4), 5 * -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))


# --- total budget ---------------------------------------------------------------------
def test_total_budget_floor():
    assert total_budget(0.001, 125_239_296) == 125_239  # OPT-125m: floor(125239.296)
    assert total_budget(0.29, 100) == 29  # binary float would give 28.999... -> 28
    assert total_budget(0.5, 3) == 1


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5, NAN])
def test_total_budget_rejects_impossible_density(density):
    with pytest.raises(ValueError, match="density"):
        total_budget(density, 1000)


def test_total_budget_too_small_or_too_large():
    with pytest.raises(ValueError, match="< 1"):
        total_budget(1e-4, 100)  # K = floor(0.01) = 0
    with pytest.raises(ValueError, match="exceeds"):
        total_budget(0.5, 1000, num_eligible_entries=100)  # K = 500 > 100
    assert total_budget(0.1, 1000, num_eligible_entries=100) == 100


# --- entropy and allocation score -----------------------------------------------------
def test_entropy_uniform_one_hot_zero_nan():
    n = 16
    # -sum(1/n * log(1/n + 1e-8)) = log(n) - about n * 1e-8 / ... : equal to log(n) within 1e-6
    assert math.isclose(matrix_entropy(torch.ones(n)), math.log(n), abs_tol=1e-6)
    assert abs(matrix_entropy(torch.tensor([0.0, 5.0, 0.0]))) < 1e-6  # one-hot: -log(1 + 1e-8)
    assert matrix_entropy(torch.zeros(3)) == 0.0  # defined, no 0/0 NaN
    assert entropy_allocation_score(torch.zeros(3)) == 0.0
    assert math.isnan(matrix_entropy(torch.tensor([1.0, NAN])))
    assert math.isnan(entropy_allocation_score(torch.tensor([1.0, INF])))
    with pytest.raises(ValueError, match="non-negative"):
        matrix_entropy(torch.tensor([-1.0, 2.0]))


def test_allocation_score_hand_computed():
    assert math.isclose(entropy_allocation_score(A), S_A, rel_tol=1e-6)
    assert math.isclose(entropy_allocation_score(B), S_B, rel_tol=1e-6)
    assert math.isclose(S_B, 3.414539, rel_tol=1e-6)


# --- entropy-guided budgets -----------------------------------------------------------
def test_entropy_guided_hand_computed():
    # K = 10: k_A = floor(10 * 2.772589 / 6.187128) = floor(4.4812) = 4,
    #         k_B = floor(10 * 3.414539 / 6.187128) = floor(5.5188) = 5; sum 9 <= 10.
    budgets = entropy_guided_budgets({"A": A, "B": B}, 10)
    assert budgets == {"A": 4, "B": 5}
    masks = select_masks({"A": A, "B": B}, budgets)
    assert masks["A"].tolist() == [0, 1, 2, 3]
    assert masks["B"].tolist() == [0, 1, 2, 3, 4]  # 4, 3, then the zero ties by lowest index


def test_entropy_guided_cap_without_redistribution():
    # C: r = [100, 100]: ||r|| = 141.42, H = ln 2 -> s_C = 98.03
    # D: r = 1 (x100):   ||r|| = 10,     H = ln 100 -> s_D = 46.05
    # K = 10: k_C = floor(6.80) = 6 -> capped at 2; k_D = floor(3.196) = 3 (nothing redistributed)
    budgets = entropy_guided_budgets({"C": torch.full((2,), 100.0), "D": torch.ones(100)}, 10)
    assert budgets == {"C": 2, "D": 3}


def test_entropy_guided_nan_and_zero_matrices_get_nothing():
    scores = {"A": A, "excluded": torch.full((3,), -INF), "zero": torch.zeros(5), "nan": torch.tensor([1.0, NAN])}
    budgets = entropy_guided_budgets(scores, 3)
    assert budgets == {"A": 3, "excluded": 0, "zero": 0, "nan": 0}
    assert sum(budgets.values()) <= 3


def test_entropy_guided_one_hot_never_negative():
    # one-hot has s = 4 * -log(1 + 1e-8) < 0 by ~4e-8; it must be clamped, not produce -1.
    budgets = entropy_guided_budgets({"A": A, "hot": torch.tensor([0.0, 4.0])}, 3)
    assert budgets == {"A": 3, "hot": 0}


def test_entropy_guided_errors():
    with pytest.raises(ValueError, match="exceeds"):
        entropy_guided_budgets({"A": A, "excluded": torch.full((100,), -INF)}, 5)  # only 4 selectable
    with pytest.raises(ValueError, match="no usable signal"):
        entropy_guided_budgets({"z": torch.zeros(4), "y": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match="non-negative"):
        entropy_guided_budgets({"pafi": torch.tensor([-1.0, -2.0])}, 1)


def test_entropy_guided_min_per_matrix():
    # Z: all zero (s = 0) would get 0; with min 2 it is pinned at 2, and the other
    # matrices split the remaining 8: k_A = floor(8 * 0.44812) = 3, k_B = floor(8 * 0.55188) = 4.
    scores = {"A": A, "B": B, "Z": torch.zeros(5), "X": torch.full((3,), -INF)}
    assert entropy_guided_budgets(scores, 10) == {"A": 4, "B": 5, "Z": 0, "X": 0}
    budgets = entropy_guided_budgets(scores, 10, min_per_matrix=2)
    assert budgets == {"A": 3, "B": 4, "Z": 2, "X": 0}  # excluded X has no entries to floor
    assert sum(budgets.values()) <= 10
    # A floor larger than a matrix is capped at its size: min 5 -> A gets its 4 entries.
    budgets = entropy_guided_budgets(scores, 15, min_per_matrix=5)
    assert budgets["A"] == 4 and budgets["Z"] == 5 and budgets["B"] >= 5 and sum(budgets.values()) <= 15
    with pytest.raises(ValueError, match="min_per_matrix"):
        entropy_guided_budgets(scores, 10, min_per_matrix=4)  # needs 4 + 4 + 4 = 12 > 10


# --- uniform and global ---------------------------------------------------------------
def test_uniform_budgets():
    assert uniform_budgets({"a": 4, "b": 6, "c": 5}, 10) == {"a": 3, "b": 3, "c": 3}  # floor(10/3)
    assert uniform_budgets({"a": 2, "b": 100}, 10) == {"a": 2, "b": 5}  # cap, no redistribution
    # an excluded matrix does not dilute the others: L = 2
    assert uniform_budgets({"a": A, "b": B, "x": torch.full((9,), -INF)}, 6) == {"a": 3, "b": 3, "x": 0}
    with pytest.raises(ValueError, match="min_per_matrix"):
        uniform_budgets({"a": 4, "b": 6}, 4, min_per_matrix=3)
    with pytest.raises(ValueError, match="exceeds"):
        uniform_budgets({"a": 4, "b": 6}, 11)


def test_global_topk_hand_computed_ties_go_to_first_matrix():
    scores = {"A": torch.tensor([5.0, 1.0, 3.0]), "B": torch.tensor([4.0, 3.0, 0.0])}
    # K = 3: 5 (A), 4 (B), then 3 tied between A[2] and B[1] -> A wins.
    assert global_topk_budgets(scores, 3) == {"A": 2, "B": 1}
    masks = select_masks(scores, global_topk_budgets(scores, 3))
    assert masks["A"].tolist() == [0, 2] and masks["B"].tolist() == [0]
    assert global_topk_budgets(scores, 4) == {"A": 2, "B": 2}
    # floors: C's best entry, A's and B's best are reserved; the one left goes to the 3-tie -> A.
    scores["C"] = torch.zeros(2)
    assert global_topk_budgets(scores, 3, min_per_matrix=1) == {"A": 1, "B": 1, "C": 1}
    assert global_topk_budgets(scores, 4, min_per_matrix=1) == {"A": 2, "B": 1, "C": 1}


def test_global_topk_skips_nan_and_minus_inf():
    scores = {"A": torch.tensor([NAN, 1.0]), "B": torch.tensor([2.0, -INF])}
    assert global_topk_budgets(scores, 2) == {"A": 1, "B": 1}
    assert select_masks(scores, {"A": 1, "B": 1})["A"].tolist() == [1]
    with pytest.raises(ValueError, match="exceeds"):
        global_topk_budgets(scores, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_per_matrix", [0, 3])
def test_global_topk_matches_brute_force(seed, min_per_matrix):
    g = torch.Generator().manual_seed(seed)
    scores = {f"m{i}": torch.randint(0, 5, (4, 5), generator=g).float() for i in range(4)}
    K = 23
    budgets = global_topk_budgets(scores, K, min_per_matrix)
    assert sum(budgets.values()) == K and min(budgets.values()) >= min_per_matrix
    # Brute force: reserve each matrix's best, then rank the rest by (-score, matrix order, index).
    chosen = set()
    for name, s in scores.items():
        order = sorted(range(s.numel()), key=lambda i: (-float(s.view(-1)[i]), i))
        chosen |= {(name, i) for i in order[:min_per_matrix]}
    rest = sorted(
        ((-float(s.view(-1)[i]), m, i, name) for m, (name, s) in enumerate(scores.items()) for i in range(s.numel())
         if (name, i) not in chosen)
    )
    chosen |= {(name, i) for *_, i, name in rest[: K - len(chosen)]}
    masks = select_masks(scores, budgets)
    assert {(n, i) for n, idx in masks.items() for i in idx.tolist()} == chosen


def test_allocation_table_rows():
    rows = allocation_table({"A": A, "B": B, "pafi": torch.tensor([-1.0])}, {"A": 4, "B": 5})
    assert [r["name"] for r in rows] == ["A", "B", "pafi"]
    a = rows[0]
    assert a["numel"] == 4 and a["budget"] == 4 and a["selectable"] == 4 and a["density"] == 1.0
    assert math.isclose(a["r_norm"], 2.0) and math.isclose(a["entropy"], math.log(4), abs_tol=1e-6)
    assert math.isclose(rows[1]["allocation_score"], S_B, rel_tol=1e-6)
    assert rows[2]["budget"] == 0 and math.isnan(rows[2]["entropy"])
