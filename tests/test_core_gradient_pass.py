"""The gradient pass (dropout off by default, on in train mode; the model leaves as it came)
and the order of the target matrices."""

from __future__ import annotations

import pytest
import torch

from gem.core.gradient_pass import accumulate_gradients, training_loss
from gem.methods import MethodError, build_method
from gem.models.tiny import tiny_bert


def _setup():
    torch.manual_seed(0)
    loaded = tiny_bert()
    method = build_method("gem", ["query", "value"], num_grad_samples=4)
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    ids = torch.randint(1000, 2000, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    return model, method.target_weights(model), batch


@pytest.mark.parametrize("train_mode", [False, True])
def test_gradient_pass_mode_sets_dropout_and_restores_the_model(train_mode):
    model, weights, batch = _setup()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = []

    def loss_fn(m, b):
        modes.append(m.training)
        return training_loss(m, b)

    first, _ = accumulate_gradients(model, [batch], weights, loss_fn=loss_fn, train_mode=train_mode)
    second, seen = accumulate_gradients(model, [batch], weights, loss_fn=loss_fn, train_mode=train_mode)
    assert modes == [train_mode, train_mode] and seen == 4
    # eval mode: no dropout, so the same data gives the same sums; train mode: dropout draws differ
    same = all(torch.equal(first[n], second[n]) for n in first)
    assert same is (not train_mode)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_unknown_gradient_pass_mode_is_a_clear_error():
    with pytest.raises(MethodError, match=r"gradient_pass_mode='dropout'.*'eval'.*'train'"):
        build_method("gem", ["query", "value"], gradient_pass_mode="dropout")


def test_targets_follow_the_layer_order_past_ten_layers():
    # String order would put layer 10 before layer 2 in budgets, allocation tables and figures.
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=12, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    method = build_method("gem", ["query", "value"])
    model = method.prepare(BertForSequenceClassification(config), ["classifier.weight", "classifier.bias"])
    targets = list(method.target_weights(model))
    layers = [int(name.split(".")[3]) for name in targets]
    assert layers == sorted(layers) and layers[:4] == [0, 0, 1, 1] and len(layers) == 24
    assert targets[:2] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]


def test_gradient_pass_runs_under_the_trainers_precision(tmp_path, data_dir, monkeypatch):
    # Lightning calls Callback.setup outside its autocast context: the pass enters it itself.
    from conftest import TINY_RUN, run_in_process

    import gem.tuner.select as sel

    autocast = []
    original = sel.accumulate_gradients

    def spy(*args, **kw):  # every module forward of the gradient pass records whether autocast is on
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, inputs: autocast.append(torch.is_autocast_enabled("cpu")))
        try:
            return original(*args, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(sel, "accumulate_gradients", spy)
    record = run_in_process([*TINY_RUN, "method=gem", "method.num_grad_samples=8", "trainer.precision=bf16-mixed",
                             f"data_dir={data_dir}", "save_checkpoint=false"], tmp_path / "run")
    assert record["status"] == "completed" and autocast and all(autocast)
    assert record["gem"]["changed_outside_mask"] == 0
