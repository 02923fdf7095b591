"""New selection rules: a score and a budget rule registered by a user module, named in the
config (`extensions=[module]`, `method.score=...`, `method.budget=...`), drive a real run."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

import gem.core.budgets as budgets
import gem.core.scores as scores
from conftest import TINY_RUN, run_in_process
from gem.methods import MethodError, build_method

USER_MODULE = '''
import torch
from gem.core.budgets import register_budget_rule
from gem.core.scores import register_score

CALLS = []

def weight_times_gradient(grad, weight):
    """|G * W0| (a SNIP-like saliency)."""
    CALLS.append(tuple(grad.shape))
    return (grad * weight).abs()

def all_in_the_first_matrix(scores, K, min_per_matrix=0):
    names = list(scores)
    return {n: (K if i == 0 else 0) for i, n in enumerate(names)}

register_score("weight_times_gradient", weight_times_gradient)
register_budget_rule("first_only", all_in_the_first_matrix)
'''


@pytest.fixture
def clean_registries():
    """Registries are module state: put them back as they were after each test."""
    saved = (dict(scores.SCORES), dict(budgets.BUDGET_RULES))
    yield
    scores.SCORES.clear(), scores.SCORES.update(saved[0])
    budgets.BUDGET_RULES.clear(), budgets.BUDGET_RULES.update(saved[1])


def test_a_registered_score_and_budget_rule_drive_a_run(clean_registries, tmp_path, data_dir, monkeypatch):
    (tmp_path / "my_rules.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    record = run_in_process([*TINY_RUN, f"data_dir={data_dir}", "save_checkpoint=false", "extensions=[my_rules]",
                             "method=gem", "method.num_grad_samples=16", "method.score=weight_times_gradient",
                             "method.budget=first_only"], tmp_path / "run")
    import my_rules

    monkeypatch.delitem(__import__("sys").modules, "my_rules")  # the next import registers afresh
    assert record["status"] == "completed"
    assert record["method_settings"]["score"] == "weight_times_gradient"
    assert len(my_rules.CALLS) == len(record["gem"]["budgets"])  # once per eligible matrix
    spent = [k for k in record["gem"]["budgets"].values() if k]
    assert spent == [record["gem"]["budget"]] == [record["gem"]["tuned"]]  # all of K in the first matrix


def test_registered_scores_follow_the_nan_policy_and_are_checked(clean_registries):
    scores.register_score("wrong_shape", lambda g, w: g.flatten())
    scores.register_score("weights_only", lambda g, w: w.abs(), needs_gradients=False)
    grads = {"a": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([[math.nan, 1.0]])}
    weights = {"a": torch.tensor([[3.0, 1.0]]), "b": torch.tensor([[1.0, 1.0]])}
    with pytest.raises(ValueError, match=r"'wrong_shape' returned .*shaped like the weight, \(1, 2\)"):
        scores.entry_scores("wrong_shape", grads, weights)
    scores.register_score("product", lambda g, w: (g * w).abs())
    product = scores.entry_scores("product", grads, weights)
    assert torch.equal(product["a"], torch.tensor([[3.0, 2.0]]))
    assert bool(torch.isneginf(product["b"]).all())  # a NaN gradient excludes the matrix, as for built-ins
    assert torch.equal(scores.entry_scores("weights_only", None, weights)["a"], torch.tensor([[3.0, 1.0]]))
    assert scores.SCORES["product"].needs_gradients and not scores.SCORES["weights_only"].needs_gradients
    assert scores.SCORES["fisher"].squared_per_example and not scores.SCORES["product"].squared_per_example
    with pytest.raises(ValueError, match="already exists"):
        scores.register_score("ratio", lambda g, w: g)
    with pytest.raises(ValueError, match="already exists"):
        budgets.register_budget_rule("entropy", lambda s, k, m=0: {})


def test_unknown_rules_are_named_when_the_method_is_built():
    with pytest.raises(MethodError, match=r"unknown score 'snip' \(method\.score\); choose one of .*register_score.*extensions"):
        build_method("gem", ["query"], score="snip")
    with pytest.raises(MethodError, match=r"unknown budget rule 'even' \(method\.budget\).*register_budget_rule"):
        build_method("gem", ["query"], budget="even")


def test_a_budget_rule_that_overspends_is_refused(clean_registries):
    from gem.models.tiny import tiny_bert

    budgets.register_budget_rule("greedy", lambda s, K, m=0: {n: K for n in s})
    loaded = tiny_bert()
    method = build_method("gem", ["query", "value"], budget="greedy", score="random")
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    with pytest.raises(MethodError, match=r"budget rule 'greedy' gave .* summing to at most K="):
        method.select(model, seed=0)


def test_an_extension_that_cannot_be_imported_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ImportError, match=r"extensions: cannot import 'no_such_rules'.*PYTHONPATH"):
        run_in_process([*TINY_RUN, f"data_dir={data_dir}", "extensions=[no_such_rules]", "method=gem"],
                       tmp_path / "run")
    record = __import__("json").loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "no_such_rules" in record["error"]


def test_budget_rules_and_scores_that_return_the_wrong_thing_are_named(clean_registries):
    from gem.models.tiny import tiny_bert

    loaded = tiny_bert()
    for name, rule, pattern in [
        ("nothing", lambda s, K, m=0: None, r"budget rule 'nothing' returned NoneType; it must return a dict"),
        ("quarters", lambda s, K, m=0: {n: K / 4.5 for n in s}, r"budget rule 'quarters' gave .* whole numbers"),
        ("zeros", lambda s, K, m=0: {n: 0 for n in s}, r"no entry selected: density=0\.001 gives K=\d+"),
    ]:
        budgets.register_budget_rule(name, rule)
        method = build_method("gem", ["query", "value"], budget=name, score="random")
        model = method.prepare(tiny_bert().model, loaded.head_parameter_names)
        with pytest.raises(MethodError, match=pattern):
            method.select(model, seed=0)
    grads = {"a": torch.tensor([[1.0, -2.0]])}
    weights = {"a": torch.tensor([[3.0, 1.0]])}
    scores.register_score("as_numpy", lambda g, w: (g * w).numpy())
    with pytest.raises(ValueError, match=r"'as_numpy' returned a numpy\.ndarray; it must return a torch\.Tensor"):
        scores.entry_scores("as_numpy", grads, weights)
    scores.register_score("half_nan", lambda g, w: torch.where(g > 0, g, math.nan))
    with pytest.raises(ValueError, match=r"'half_nan' returned 1 NaN/inf .* of 2 entries; a score must be finite"):
        scores.entry_scores("half_nan", grads, weights)
    with pytest.raises(MethodError, match=r"min_per_matrix=-1 \(method\.min_per_matrix\) must be a whole number >= 0"):
        build_method("gem", ["query"], min_per_matrix=-1)


def test_a_budget_too_small_for_one_entry_per_matrix_is_refused(tmp_path, data_dir):
    # tiny BERT: ~1M parameters, 4 query/value matrices; K = 3 under uniform budgets gives 0 each
    with pytest.raises(MethodError, match=r"no entry selected: density=3e-06 gives K=3 entries for 4 target "
                                          r"matrices.*Raise method\.density to at least 4"):
        run_in_process([*TINY_RUN, f"data_dir={data_dir}", "save_checkpoint=false", "method=gem_uniform",
                        "method.num_grad_samples=8", "method.density=3e-6"], tmp_path / "run")


def test_a_named_variant_from_config_alone_runs_under_its_own_name(tmp_path, data_dir):
    # README: "For a named ablation, add conf/method/<name>.yaml with defaults: [gem, _self_]"
    conf = tmp_path / "my_conf" / "method"
    conf.mkdir(parents=True)
    (conf / "grad_global.yaml").write_text("defaults:\n  - gem\n  - _self_\nname: grad_global\n"
                                           "score: gradient\nbudget: global\n")
    record = run_in_process([*TINY_RUN, f"data_dir={data_dir}", "save_checkpoint=false", "method=grad_global",
                             "method.num_grad_samples=8", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"],
                            tmp_path / "run")
    assert record["status"] == "completed" and record["method"] == "grad_global"
    assert record["method_settings"]["score"] == "gradient" and record["method_settings"]["budget"] == "global"
    assert record["gem"]["changed_outside_mask"] == 0
    with pytest.raises(MethodError, match=r"unknown method 'nameless'.*`base`.*register_method"):
        build_method("nameless", ["query"])
