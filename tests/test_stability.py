"""experiments/stability.py: prefix-sum masks equal `select_entries`' masks; the outputs' shape and ranges."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import stability
from gem.tuner import select_entries
from gem.tuner.select import masks_from_sums

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_prefix_masks_equal_select_entries(model, data_dir):
    """The mask of every prefix of one pass is bit for bit the mask `select_entries` makes from a pass
    over only those first examples (same loader, loss and batch size), for both rules."""
    setup = stability.Setup(model, "rte", 1, str(data_dir), batch_size=4, extra_overrides=["task.max_length=64"])
    masks, facts = stability.prefix_masks(setup, [8, 16], 24)
    assert facts["examples"] == 24 and set(masks) == set(stability.RULES)
    for rule in stability.RULES:
        assert sorted(masks[rule]) == [8, 16, 24]
        for n in (8, 16, 24):
            # a fresh config of the same rule, asking for the first n examples
            config = type(setup.configs[rule])(**{k: getattr(setup.configs[rule], k) for k in
                                                  ("target_modules", "density", "score", "budget", "eps",
                                                   "min_per_matrix", "gradient_pass_mode", "gradient_pass_loss")},
                                               num_grad_samples=n)
            selection = select_entries(setup.model, config, setup.datamodule.gradient_pass_dataloader(n),
                                       setup.loss_fn)
            assert selection.gradient_samples == n
            ours = {name: idx for name, idx in masks[rule][n].items() if idx.numel()}
            assert list(ours) == list(config.indices)
            for name, idx in config.indices.items():
                assert torch.equal(idx.to(torch.int64), ours[name].to(torch.int64)), (rule, n, name)
    # the masks differ between sizes (the comparison measures something)
    assert any(not torch.equal(masks["gem"][8][k], masks["gem"][24][k]) for k in masks["gem"][24])


def test_masks_from_sums_is_select_entries_math(data_dir):
    """`select_entries` = gradient pass + `masks_from_sums` (the refactor kept one implementation)."""
    from gem.core.gradient_pass import accumulate_gradients

    setup = stability.Setup("tiny-bert", "rte", 2, str(data_dir), batch_size=4, extra_overrides=["task.max_length=64"])
    config = setup.configs["gem_uniform"]
    config.num_grad_samples = 8
    grads, seen = accumulate_gradients(setup.model, setup.datamodule.gradient_pass_dataloader(8), setup.weights,
                                       loss_fn=setup.loss_fn)
    chosen = masks_from_sums(config, setup.weights, grads, seen, setup.num_parameters)
    selection = select_entries(setup.model, config, setup.datamodule.gradient_pass_dataloader(8), setup.loss_fn)
    assert selection.budgets == chosen.budgets and selection.total_budget == chosen.total_budget
    assert all(torch.equal(chosen.indices[n], idx) for n, idx in config.indices.items())


def test_stability_command_tiny(tmp_path, data_dir):
    out = tmp_path / "stab"
    argv = ["--models", "tiny-bert", "--tasks", "rte", "--sizes", "8,16", "--max-examples", "24", "--seeds", "1,2",
            "--data-dir", str(data_dir), "--out", str(out), "--override", "task.max_length=64"]
    stability.main(argv)
    data = json.loads((out / "stability.json").read_text())
    assert (out / "jaccard.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| tiny-bert | rte | gem |" in table and "| tiny-bert | rte | gem_uniform |" in table
    assert data["settings"]["sizes"] == [8, 16] and data["settings"]["reference_size"] == 24
    assert [(p["seed"], p["examples"]) for p in data["passes"]] == [(1, 24), (2, 24)]
    assert [c["rule"] for c in data["cells"]] == ["gem", "gem_uniform"]
    for cell in data["cells"]:
        assert [p["size"] for p in cell["prefix"]] == [8, 16, 24]
        reference = cell["prefix"][-1]
        assert reference["jaccard"] == 1.0 and reference["budget_shift"] == 0.0
        assert all(j == 1.0 for j in reference["per_matrix"].values() if j is not None)
        points = cell["prefix"] + cell["seed_pairs"]
        assert [p["seeds"] for p in cell["seed_pairs"]] == [[1, 2]]
        for p in points:
            assert 0.0 <= p["jaccard"] <= 1.0 and 0.0 <= p["budget_shift"] <= 1.0 and 0.0 <= p["chance_jaccard"] <= 1.0
            assert all(j is None or 0.0 <= j <= 1.0 for j in p["per_matrix"].values())
        if cell["rule"] == "gem_uniform":  # uniform budgets do not depend on the data
            assert all(p["budget_shift"] == 0.0 for p in points)
        assert sum(cell["budgets"]["1"].values()) <= cell["total_budget"]
    # a second run takes every pass's masks from the cache and writes the same numbers
    again = stability.main(argv)
    assert again["cells"] == data["cells"]
