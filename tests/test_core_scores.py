from __future__ import annotations

import logging
import math

import pytest
import torch

from gem.core.scores import (
    SCORES,
    check_gradients,
    entry_scores,
    excluded_matrices,
    fisher_score,
    gradient_magnitude,
    gradient_to_weight_ratio,
    random_score,
    selectable_count,
    smallest_weight_score,
)

NAN, INF = float("nan"), float("inf")


def test_ratio_hand_computed_and_zero_weight_is_finite():
    grad = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    weight = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    # |G| / (|W0| + 1e-8): 1/0.5 = 2, 2/1 = 2, 0/2 = 0, 3/1e-8 = 3e8 (zero weight: large, finite)
    r = gradient_to_weight_ratio(grad, weight)
    expected = torch.tensor([[2.0, 2.0], [0.0, 3e8]])
    assert torch.allclose(r, expected, rtol=1e-6)
    assert torch.isfinite(r).all()


def test_ratio_in_half_precision_stays_finite():
    # In fp16, 0 + 1e-8 rounds to 0; the score is computed in float32 to avoid |G|/0.
    r = gradient_to_weight_ratio(torch.tensor([1.0], dtype=torch.float16), torch.tensor([0.0], dtype=torch.float16))
    assert r.dtype == torch.float32
    assert torch.isfinite(r).all() and math.isclose(float(r), 1e8, rel_tol=1e-6)


def test_ratio_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        gradient_to_weight_ratio(torch.ones(2, 3), torch.ones(3, 2))


def test_gradient_magnitude_and_fisher():
    assert torch.equal(gradient_magnitude(torch.tensor([-1.5, 2.0])), torch.tensor([1.5, 2.0]))
    # sum of squared per-sample grads [4, 9] over 2 samples -> mean [2, 4.5]
    assert torch.equal(fisher_score(torch.tensor([4.0, 9.0]), 2), torch.tensor([2.0, 4.5]))
    with pytest.raises(ValueError, match="num_samples"):
        fisher_score(torch.ones(2), 0)


def test_smallest_weight_ranks_small_magnitudes_first():
    s = smallest_weight_score(torch.tensor([0.5, -0.01, 2.0, 0.1]))
    assert torch.argsort(s, descending=True).tolist() == [1, 3, 0, 2]


def test_random_score_is_reproducible_and_uniform():
    a = random_score((3, 4), torch.Generator().manual_seed(0))
    b = random_score((3, 4), torch.Generator().manual_seed(0))
    assert a.shape == (3, 4) and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())


def test_check_gradients_reports_bad_matrices():
    grads = {"a": torch.ones(2), "b": torch.tensor([1.0, NAN]), "c": torch.tensor([INF, 0.0]), "d": torch.zeros(2)}
    assert check_gradients(grads) == ["b", "c"]


@pytest.mark.parametrize(
    "grads",
    [
        {"a": torch.full((2,), NAN), "b": torch.tensor([INF, 1.0])},  # all non-finite
        {"a": torch.zeros(3), "b": torch.zeros(2, 2)},  # all zero
        {"a": torch.zeros(3), "b": torch.tensor([NAN])},  # zero + non-finite
    ],
)
def test_check_gradients_raises_without_usable_signal(grads):
    with pytest.raises(ValueError, match="no usable signal"):
        check_gradients(grads)


def test_entry_scores_excludes_nan_matrix(caplog):
    grads = {"q": torch.tensor([[1.0, 2.0]]), "v": torch.tensor([[NAN, 1.0]])}
    weights = {"q": torch.tensor([[1.0, 1.0]]), "v": torch.tensor([[1.0, 1.0]])}
    with caplog.at_level(logging.WARNING, logger="gem.core.scores"):
        scores = entry_scores("ratio", grads, weights)
    assert list(scores) == ["q", "v"]
    assert torch.allclose(scores["q"], torch.tensor([[1.0, 2.0]]))
    assert torch.equal(scores["v"], torch.full((1, 2), -INF))
    assert "v" in caplog.text
    assert excluded_matrices(scores) == ["v"]
    assert selectable_count(scores["q"]) == 2 and selectable_count(scores["v"]) == 0


def test_entry_scores_all_kinds_and_errors():
    grads = {"a": torch.tensor([2.0, -4.0])}
    weights = {"a": torch.tensor([1.0, -2.0])}
    assert torch.allclose(entry_scores("ratio", grads, weights)["a"], torch.tensor([2.0, 2.0]))
    assert torch.equal(entry_scores("gradient", grads)["a"], torch.tensor([2.0, 4.0]))
    assert torch.equal(entry_scores("fisher", grads, num_samples=2)["a"], torch.tensor([1.0, -2.0]))
    assert torch.equal(entry_scores("smallest_weight", weights=weights)["a"], torch.tensor([-1.0, -2.0]))
    assert entry_scores("random", weights=weights, generator=torch.Generator().manual_seed(1))["a"].shape == (2,)
    assert set(SCORES) == {"ratio", "gradient", "fisher", "smallest_weight", "random"}
    with pytest.raises(ValueError, match="unknown score kind"):
        entry_scores("magic", grads, weights)
    with pytest.raises(ValueError, match="weights"):
        entry_scores("ratio", grads)
    with pytest.raises(ValueError, match="num_samples"):
        entry_scores("fisher", grads)
    with pytest.raises(ValueError, match="same keys"):
        entry_scores("ratio", grads, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="no usable signal"):
        entry_scores("ratio", {"a": torch.zeros(2)}, weights)



def test_random_score_with_cpu_generator_on_another_device(monkeypatch):
    # A GPU run of random_mask passes a CPU generator for CUDA weights, which torch.rand refuses
    # ("Expected a 'cuda' device type for generator"). No GPU here: the meta device stands in
    # for it, and torch.rand is wrapped to refuse a generator of another device as CUDA does.
    real_rand = torch.rand

    def strict_rand(*size, generator=None, device=None, **kwargs):
        if generator is not None and device is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real_rand(*size, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "rand", strict_rand)
    weights = {"a": torch.empty(3, 4, device="meta")}
    on_meta = entry_scores("random", weights=weights, generator=torch.Generator().manual_seed(5))["a"]
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 4)
    # drawn on the generator's device, so the mask does not depend on where the model sits
    assert torch.equal(random_score((3, 4), torch.Generator().manual_seed(5), device="cpu"),
                       real_rand((3, 4), generator=torch.Generator().manual_seed(5)))
