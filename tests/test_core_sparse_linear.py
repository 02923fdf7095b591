"""SparseDeltaLinear: exact sparse gradients, k-sized optimizer state, frozen entries bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gem.core.sparse_linear import (
    SparseDeltaLinear,
    inject_sparse_deltas,
    materialize,
    remove_sparse_deltas,
    sddmm_supported,
    selection_pattern,
    sparse_modules,
    sparse_weight_grad,
)


def random_indices(linear: nn.Linear, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(linear.weight.numel(), generator=generator)[:k]).values


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5))


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def targets(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]


def inject_random(model: nn.Module, names: list[str], k: int, **options) -> dict[str, SparseDeltaLinear]:
    gen = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    chosen = {n: random_indices(modules[n], k, gen) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    return inject_sparse_deltas(model, chosen, **options)


def dense_reference_grads(reference: nn.Module, names: list[str], loss_fn) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy: dense weight gradients of the named linears."""
    modules = dict(reference.named_modules())
    for p in reference.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    loss_fn(reference).backward()
    return {n: modules[n].weight.grad.detach().clone() for n in names}


# --- the gradient itself ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)], ids=["2d", "3d"])
def test_delta_grad_equals_dense_grad_gathered(shape):
    torch.manual_seed(0)
    linear = nn.Linear(12, 9)
    reference = copy.deepcopy(linear)
    idx = random_indices(linear, 20, torch.Generator().manual_seed(0))
    module = SparseDeltaLinear(linear, idx, train_bias=True)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    target = torch.randn(*shape[:-1], 9)

    ((module(x) - target) ** 2).sum().backward()
    ((reference(x_ref) - target) ** 2).sum().backward()

    assert module.weight.grad is None  # the dense gradient is never formed
    torch.testing.assert_close(module.delta.grad, reference.weight.grad.view(-1)[idx])
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(module.bias.grad, reference.bias.grad)


def test_chunked_gather_matches_unchunked():
    torch.manual_seed(0)
    g, x = torch.randn(3, 11, 6), torch.randn(3, 11, 8)
    rows, cols = torch.randint(0, 6, (17,)), torch.randint(0, 8, (17,))
    full = sparse_weight_grad(g, x, rows, cols)
    chunked = sparse_weight_grad(g, x, rows, cols, max_elements=17 * 4)  # 4 tokens per chunk
    dense = torch.einsum("...o,...i->oi", g, x)[rows, cols]
    torch.testing.assert_close(full, dense)
    torch.testing.assert_close(chunked, dense)


def test_sampled_product_matches_gather_and_dense():
    torch.manual_seed(0)
    g, x = torch.randn(2, 9, 6), torch.randn(2, 9, 8)
    flat = torch.sort(torch.randperm(48)[:13]).values  # sorted row-major, as modules keep them
    rows, cols = flat // 8, flat % 8
    pattern = selection_pattern(rows, cols, (6, 8))
    assert sddmm_supported(torch.device("cpu"))  # else the CPU step falls back to the slower gather
    sampled = sparse_weight_grad(g, x, rows, cols, pattern=pattern)
    gathered = sparse_weight_grad(g, x, rows, cols)
    dense = torch.einsum("...o,...i->oi", g, x)[rows, cols]
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled, dense)
    torch.testing.assert_close(gathered, dense)
    # bf16 activations (autocast): still accumulated in fp32, close to the fp32 sums of the same inputs
    g16, x16 = g.bfloat16(), x.bfloat16()
    want = torch.einsum("...o,...i->oi", g16.float(), x16.float())[rows, cols]
    torch.testing.assert_close(sparse_weight_grad(g16, x16, rows, cols, pattern=pattern), want)


@pytest.mark.parametrize("kernel", ["sddmm", "gather", "dense"])
def test_every_weight_grad_kernel_gives_the_same_entries(kernel):
    from gem.core.sparse_linear import set_weight_grad_kernel, weight_grad_kernel

    torch.manual_seed(0)
    linear = nn.Linear(12, 9)
    reference = copy.deepcopy(linear)
    idx = random_indices(linear, 20, torch.Generator().manual_seed(0))
    module = SparseDeltaLinear(linear, idx)
    x = torch.randn(3, 5, 12)
    assert weight_grad_kernel(torch.device("cpu")) == "sddmm"  # the CPU default
    set_weight_grad_kernel(kernel)
    try:
        assert weight_grad_kernel(torch.device("cpu")) == kernel
        module(x).pow(2).sum().backward()
    finally:
        set_weight_grad_kernel("auto")
    reference.weight.requires_grad_(True)
    reference(x).pow(2).sum().backward()
    assert module.weight.grad is None and module.delta.grad.dtype == torch.float32
    torch.testing.assert_close(module.delta.grad, reference.weight.grad.view(-1)[idx])


def test_unknown_weight_grad_kernel_is_a_clear_error(monkeypatch):
    from gem.core.sparse_linear import set_weight_grad_kernel, weight_grad_kernel

    with pytest.raises(ValueError, match=r"Unknown weight-gradient kernel 'fast'; use one of auto, sddmm"):
        set_weight_grad_kernel("fast")
    monkeypatch.setenv("GEM_WEIGHT_GRAD_KERNEL", "cusparse")
    with pytest.raises(ValueError, match=r"GEM_WEIGHT_GRAD_KERNEL='cusparse'; use one of"):
        weight_grad_kernel(torch.device("cpu"))
    monkeypatch.setenv("GEM_WEIGHT_GRAD_KERNEL", "gather")
    assert weight_grad_kernel(torch.device("cpu")) == "gather"


def test_pattern_follows_loaded_indices_and_survives_copies():
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(8, 6)
    module = SparseDeltaLinear(linear, random_indices(linear, 7, gen))
    other = SparseDeltaLinear(nn.Linear(8, 6), random_indices(linear, 7, gen))
    module(torch.randn(2, 8)).sum().backward()  # builds and caches the pattern
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.selection_pattern().col_indices(), other.cols)
    clone = copy.deepcopy(module)
    x = torch.randn(3, 8)
    clone(x).sum().backward()
    other(x).sum().backward()
    torch.testing.assert_close(clone.delta.grad, other.delta.grad)


def test_bias_frozen_by_default_and_no_grad_for_it():
    linear = nn.Linear(4, 3)
    module = SparseDeltaLinear(linear, torch.tensor([0, 5]))
    module(torch.randn(2, 4)).sum().backward()
    assert module.bias.grad is None and module.delta.grad is not None
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["delta"]


# --- training with AdamW ------------------------------------------------------------------------


def run_adamw(model: nn.Module, loss_fn, steps: int = 4) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()
    return optimizer


def assert_sparse_training_invariants(model, original, modules, optimizer):
    total_k = sum(m.num_selected for m in modules.values())
    state_numel = sum(s[key].numel() for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    assert state_numel == 2 * total_k  # (a)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(m.delta) for m in modules.values()}
    materialize(model)  # the weight is rewritten at each forward; the last step is not yet in it
    original_modules = dict(original.named_modules())
    for name, module in modules.items():
        w0 = original_modules[name].weight.detach().view(-1)
        w = module.weight.detach().view(-1)
        unselected = torch.ones_like(w, dtype=torch.bool)
        unselected[module.indices] = False
        assert torch.equal(w[unselected], w0[unselected])  # (b) bit-identical
        assert not torch.equal(w[module.indices], w0[module.indices])  # (c)
        assert torch.equal(w[module.indices], (w0[module.indices].float() + module.delta.float()).to(w.dtype))
        assert torch.equal(module.base_values, w0[module.indices])
    # the frozen rest of the model is untouched as well
    trained_state = model.state_dict()
    for n, p0 in original.state_dict().items():
        if not any(n.startswith(name + ".") for name in modules):
            assert torch.equal(trained_state[n], p0), n


def test_mlp_adamw_state_and_frozen_entries():
    model, x, y = mlp(), torch.randn(6, 12), torch.randn(6, 5)
    original = copy.deepcopy(model)
    modules = inject_random(model, ["0", "2"], k=10)
    loss_fn = lambda m: ((m(x) - y) ** 2).mean()  # noqa: E731
    optimizer = run_adamw(model, loss_fn)
    assert_sparse_training_invariants(model, original, modules, optimizer)

    # (d) after training: the delta gradient equals the dense gradient of a plain copy
    reference = copy.deepcopy(model)
    remove_sparse_deltas(reference)
    dense = dense_reference_grads(reference, ["0", "2"], loss_fn)
    model.zero_grad()
    loss_fn(model).backward()
    for name, module in modules.items():
        torch.testing.assert_close(module.delta.grad, dense[name].view(-1)[module.indices])


def test_tiny_bert_query_value_adamw():
    model = tiny_bert()
    original = copy.deepcopy(model)
    names = targets(model, ("query", "value"))
    assert len(names) == 4
    modules = inject_random(model, names, k=25)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    loss_fn = lambda m: m(input_ids=ids).last_hidden_state.pow(2).mean()  # noqa: E731
    optimizer = run_adamw(model, loss_fn, steps=3)
    assert_sparse_training_invariants(model, original, modules, optimizer)

    reference = copy.deepcopy(model)
    remove_sparse_deltas(reference)
    dense = dense_reference_grads(reference, names, loss_fn)
    model.zero_grad()
    loss_fn(model).backward()
    for name, module in modules.items():
        torch.testing.assert_close(module.delta.grad, dense[name].view(-1)[module.indices])
    keys = model.state_dict().keys()
    assert "encoder.layer.0.attention.self.query.weight" in keys
    assert "encoder.layer.0.attention.self.query.delta" in keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_and_cpu_autocast(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8).to(dtype)
    reference = copy.deepcopy(linear).float()
    idx = random_indices(linear, 30, torch.Generator().manual_seed(0))
    module = SparseDeltaLinear(linear, idx)
    x = torch.randn(4, 3, 16).to(dtype)
    out = module(x)
    assert out.dtype == dtype
    out.float().pow(2).sum().backward()
    assert module.delta.dtype == torch.float32 and module.delta.grad.dtype == torch.float32
    reference.weight.requires_grad_(True)
    reference(x.float()).pow(2).sum().backward()
    torch.testing.assert_close(module.delta.grad, reference.weight.grad.view(-1)[idx], rtol=3e-2, atol=3e-2)
    torch.optim.AdamW([module.delta], lr=1e-2, weight_decay=0.1).step()
    module(x)  # writes the bf16-rounded new values
    assert not torch.equal(module.weight.view(-1)[idx], module.base_values)

    # fp32 weights under CPU autocast: bf16 forward, fp32 gradients
    fp32 = SparseDeltaLinear(nn.Linear(16, 8), idx)
    x32 = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32(x32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x32.grad.dtype == torch.float32 and fp32.delta.grad.dtype == torch.float32


# --- options, helpers, errors ------------------------------------------------------------------------


def test_init_w0_starts_at_twice_w0():
    linear = nn.Linear(6, 4)
    w0 = linear.weight.detach().clone().view(-1)
    idx = torch.tensor([1, 7, 20])
    module = SparseDeltaLinear(linear, idx, init="w0")
    module(torch.randn(1, 6))
    torch.testing.assert_close(module.weight.view(-1)[idx], 2 * w0[idx])
    torch.testing.assert_close(module.base_weight(), w0.view(4, 6))


def test_state_dict_round_trip_and_remove():
    model, x = mlp(), torch.randn(3, 12)
    base = copy.deepcopy(model)
    modules = inject_random(model, ["0", "2"], k=8)
    with torch.no_grad():
        for m in modules.values():
            m.delta.normal_()
    expected = model(x)
    fresh = copy.deepcopy(base)
    inject_random(fresh, ["0", "2"], k=8)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)
    assert [n for n, _ in sparse_modules(model)] == ["0", "2"]

    materialize(model)
    restored = remove_sparse_deltas(model)
    assert set(restored) == {"0", "2"} and type(model[0]) is nn.Linear
    assert not model[0].weight.requires_grad  # flags as at injection (inject_random froze them)

    plain = mlp()
    inject_sparse_deltas(plain, {"0": torch.tensor([1, 2])})
    assert not plain[0].weight.requires_grad
    remove_sparse_deltas(plain)
    assert plain[0].weight.requires_grad and plain[0].bias.requires_grad
    assert torch.equal(model(x), expected)


def test_two_forwards_before_backward_do_not_break_autograd():
    module = SparseDeltaLinear(nn.Linear(4, 3), torch.tensor([0, 3, 9]))
    x = torch.randn(2, 4)
    loss = module(x).sum() + module(x).sum()
    loss.backward()
    assert module.delta.grad is not None


@pytest.mark.parametrize(
    "indices_by_name, message",
    [
        ({"nope": torch.tensor([0])}, "no module named 'nope'"),
        ({"1": torch.tensor([0])}, "'1' is a GELU, not an nn.Linear"),
        ({"0": torch.tensor([0, 12 * 16])}, "out of range"),
        ({"0": torch.tensor([3, 1, 3])}, "not unique"),
        ({"0": torch.tensor([0.5])}, "integer tensor"),
    ],
)
def test_inject_errors_name_the_module(indices_by_name, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        inject_sparse_deltas(model, indices_by_name)
    assert type(model[0]) is nn.Linear  # nothing replaced


def test_inject_sorts_and_rejects_double_injection():
    model = mlp()
    modules = inject_sparse_deltas(model, {"0": torch.tensor([9, 2, 5])})
    assert modules["0"].indices.tolist() == [2, 5, 9]
    with pytest.raises(ValueError, match="already has a sparse delta"):
        inject_sparse_deltas(model, {"0": torch.tensor([1])})
