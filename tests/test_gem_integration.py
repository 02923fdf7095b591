"""GEM through the whole run: budget, truly sparse optimizer state, nothing outside the mask moves.

The session's tiny GEM run (conftest.method_runs: tiny BERT, 32 RTE examples, one epoch)
carries a probe callback that looks at the optimizer Lightning built and at the trained
model, which is then compared with a freshly loaded copy of the pre-trained model.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gem_run(method_runs):
    run = method_runs("gem")
    return run.record, run.probe


def test_tuned_count_matches_the_budget(gem_run):
    record, _ = gem_run
    assert record["status"] == "completed"
    params, settings = record["params"], record["method_settings"]
    budget = math.floor(0.001 * params["total"])
    assert settings["total_budget"] == budget == record["gem"]["budget"]
    # Per-matrix floors may lose a few entries of K, never more than 1%.
    assert budget * 0.99 <= params["tuned"] <= budget
    assert params["tuned"] == record["gem"]["tuned"] == sum(record["gem"]["budgets"].values())
    assert params["trainable"] == params["tuned"] + params["head"]
    assert record["gem"]["gradient_samples"] == 16


def test_nothing_changed_outside_the_mask_in_the_record(gem_run):
    record, _ = gem_run
    assert record["gem"]["changed_outside_mask"] == 0
    assert 0 < record["gem"]["changed_inside_mask"] <= record["params"]["tuned"]


def test_optimizer_state_is_two_numbers_per_tuned_entry(gem_run):
    record, probe = gem_run
    tuned, head = record["params"]["tuned"], record["params"]["head"]
    deltas = sorted(n for n in probe.optimized if ".gem_delta." in n)
    # The optimizer sees the deltas and the head, nothing else (no dense weight).
    assert sorted(probe.optimized) == sorted(deltas + sorted(probe.head))
    assert len(deltas) == len(probe.masks)
    assert {"exp_avg", "exp_avg_sq"} <= probe.state_keys
    assert sum(v for n, v in probe.state_numel.items() if ".gem_delta." in n) == 2 * tuned
    assert sum(probe.state_numel.values()) == 2 * (tuned + head)


def test_no_unselected_entry_changed_against_a_fresh_base_model(gem_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from omegaconf import OmegaConf

    from gem.models import load_model

    record, probe = gem_run
    fresh = load_model(OmegaConf.create(record["config"]["model"]), "classification", 2).model
    outside = inside = 0
    compared = 0
    for name, before in fresh.named_parameters():
        if name in probe.head:
            continue
        after = probe.params[name]
        changed = after.ne(before.detach()).view(-1)
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in probe.masks:
            in_mask = torch.zeros_like(changed)
            in_mask[probe.masks[module]] = True
            inside += int((changed & in_mask).sum())
            outside += int((changed & ~in_mask).sum())
        else:
            outside += int(changed.sum())
        compared += 1
    assert compared == sum(1 for n, _ in fresh.named_parameters() if n not in probe.head)
    assert outside == 0
    assert inside == record["gem"]["changed_inside_mask"] > 0
