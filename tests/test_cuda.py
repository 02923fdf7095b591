"""GEM's sparse path on a CUDA GPU: exact sparse gradients (every weight-gradient kernel),
autocast bf16/fp16, and a whole GEM selection + fp16 GradScaler training that leaves every
unselected entry bit-identical.

These tests skip where no GPU is visible (CI has none); they run with `pytest tests/test_cuda.py`
on a machine that has one. The CPU versions of the same checks are in test_core_sparse_linear.py
and run everywhere. The models here are built from configs, so no tokenizer or weights are needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gem.core.sparse_linear import sddmm_supported, selection_pattern, sparse_weight_grad
from gem.tuner import GemLinear, gem_modules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
CUDA = torch.device("cuda")


def test_sampled_product_runs_on_cuda_and_matches_dense():
    # Without the kernel every step would fall back to the slower gather: that is a finding, not a pass.
    assert sddmm_supported(CUDA)
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(3, 50, 40, generator=gen), torch.randn(3, 50, 64, generator=gen)
    flat = torch.sort(torch.randperm(40 * 64, generator=gen)[:300]).values
    rows, cols = flat // 64, flat % 64
    dense = torch.einsum("...o,...i->oi", g.double(), x.double())[rows, cols].float()
    g, x, rows, cols = g.to(CUDA), x.to(CUDA), rows.to(CUDA), cols.to(CUDA)
    pattern = selection_pattern(rows, cols, (40, 64))
    sampled = sparse_weight_grad(g, x, rows, cols, pattern=pattern)
    gathered = sparse_weight_grad(g, x, rows, cols, max_elements=300 * 16)
    assert sampled.device.type == "cuda" and sampled.dtype == torch.float32
    torch.testing.assert_close(sampled.cpu(), dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gathered.cpu(), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_weight_grad_kernels_on_cuda(dtype):
    assert sddmm_supported(CUDA)  # the sampled product is the default where the pattern is given
    gen = torch.Generator().manual_seed(2)
    g, x = torch.randn(1024, 96, generator=gen), torch.randn(1024, 80, generator=gen)
    flat = torch.sort(torch.randperm(96 * 80, generator=gen)[:500]).values
    rows, cols = flat // 80, flat % 80
    g, x = g.to(dtype), x.to(dtype)
    want = (g.double().T @ x.double()).view(-1)[flat].float()
    g, x, rows, cols = g.to(CUDA), x.to(CUDA), rows.to(CUDA), cols.to(CUDA)
    pattern = selection_pattern(rows, cols, (96, 80))
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    for kernel, kwargs in (("sddmm", {"pattern": pattern}), ("gather", {})):
        got = sparse_weight_grad(g, x, rows, cols, **kwargs)
        assert got.dtype == torch.float32, kernel
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=kernel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_grad_under_cuda_autocast(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(CUDA)
    reference = copy.deepcopy(linear)
    idx = torch.sort(torch.randperm(64 * 48)[:100]).values
    module = GemLinear(linear, "default", idx)
    delta = module.gem_delta["default"]
    x = torch.randn(4, 20, 64, device=CUDA)
    with torch.autocast("cuda", dtype=dtype):
        y = module(x)
        y_ref = reference(x)
    assert y.dtype == dtype
    y.float().pow(2).sum().backward()
    y_ref.float().pow(2).sum().backward()
    assert module.weight.grad is None and delta.grad.dtype == torch.float32
    want = reference.weight.grad.view(-1)[idx.to(CUDA)]
    torch.testing.assert_close(delta.grad, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def test_gem_selection_and_fp16_gradscaler_training_on_cuda():
    # The paper's protocol trains in fp16 with a gradient scaler, which only a GPU exercises:
    # scaled sparse gradients, unscale, skipped steps on overflow, AdamW on K entries.
    from gem.methods import build_method

    model = _bert_classifier().to(CUDA)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("gem", ["query", "value"], density=0.01, num_grad_samples=16)
    model = method.prepare(model, ["classifier.weight", "classifier.bias"])
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, 120, (8, 24), generator=gen).to(CUDA),
                "labels": torch.randint(0, 2, (8,), generator=gen).to(CUDA)} for _ in range(2)]
    model = method.select(model, batches, seed=0)
    assert method.selection.gradient_samples == 16
    layers = {n.removeprefix("base_model.model."): m for n, m in gem_modules(model)}
    k = sum(m.gem_indices["default"].numel() for m in layers.values())
    assert k == method.tuned_count(model) > 0

    optimizer = torch.optim.AdamW(method.optimizer_param_groups(model, 0.01), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    model.train()
    for batch in batches * 3:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(loss)
    head = {id(p) for n, p in model.named_parameters() if ".classifier." in n}
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                  for p, s in optimizer.state.items() if id(p) not in head)
    assert moments == 2 * k

    changed_inside = 0
    for name, layer in layers.items():
        layer.materialize()
        idx = layer.gem_indices["default"]
        w0 = original[f"{name}.weight"].view(-1)
        w = layer.weight.detach().view(-1)
        outside = torch.ones_like(w, dtype=torch.bool)
        outside[idx] = False
        assert torch.equal(w[outside], w0[outside]), name
        changed_inside += int((w[idx] != w0[idx]).sum())
    assert changed_inside > 0
    plain = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
             for n, p in model.named_parameters() if ".gem_delta." not in n and "classifier" not in n}
    for n, p in plain.items():  # the frozen rest: bit-identical
        if not any(n.startswith(m + ".") for m in layers):
            assert torch.equal(p.detach(), original[n]), n


def test_flat_adamw_fused_on_cuda_matches_fused_adamw():
    """GEM's one-vector update on a GPU (fused, as the Lightning module builds it) against torch's fused
    AdamW over the same tensors, through an fp16 GradScaler with one overflowing step."""
    from gem.core.flat_adamw import FlatAdamW

    def run(cls):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(n, generator=gen).to(CUDA)) for n in (70, 3, 129, 513)]
        optimizer = cls(params, lr=1e-3, weight_decay=0.01, fused=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
        for step in range(6):
            loss = sum((p * (i + 1)).sum() for i, p in enumerate(params))
            scaler.scale(loss * float("inf") if step == 2 else loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return torch.cat([p.detach() for p in params]), scaler.get_scale()

    (want, want_scale), (got, got_scale) = run(torch.optim.AdamW), run(FlatAdamW)
    assert got_scale == want_scale == 2.0 ** 9
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
