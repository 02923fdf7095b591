"""GemLinear and its kernels: exact sparse gradients, k-sized optimizer state, frozen entries bit-exact.

Layers are built directly (`GemLinear(linear, "default", indices)`) or through the PEFT tuner
with hand-made indices (`wrap`), the way `select_entries` hands them over.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from gem.core.sparse_linear import sddmm_supported, selection_pattern, sparse_weight_grad
from gem.tuner import GemConfig, GemLinear, gem_modules


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


def wrap(model: nn.Module, indices: dict[str, torch.Tensor], **options):
    """The model wrapped by the GEM tuner with these entries selected (as select_entries leaves a config)."""
    config = GemConfig(target_modules=list(indices), budgets={n: len(i) for n, i in indices.items()},
                       indices=dict(indices), **options)
    return get_peft_model(model, config)


def inject_random(model: nn.Module, names: list[str], k: int, **options):
    gen = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    wrapped = wrap(model, {n: random_indices(modules[n], k, gen) for n in names}, **options)
    return wrapped, {n.removeprefix("base_model.model."): m for n, m in gem_modules(wrapped)}


def dense_reference_grads(reference: nn.Module, names: list[str], loss_fn) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy: dense weight gradients of the named linears."""
    modules = dict(reference.named_modules())
    for p in reference.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    loss_fn(reference).backward()
    return {n: modules[n].weight.grad.detach().clone() for n in names}


def delta(layer: GemLinear) -> torch.Tensor:
    return layer.gem_delta["default"]


def indices(layer: GemLinear) -> torch.Tensor:
    return layer.gem_indices["default"]


# --- the gradient itself ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)], ids=["2d", "3d"])
def test_delta_grad_equals_dense_grad_gathered(shape):
    torch.manual_seed(0)
    linear = nn.Linear(12, 9)
    reference = copy.deepcopy(linear)
    idx = random_indices(linear, 20, torch.Generator().manual_seed(0))
    module = GemLinear(linear, "default", idx)
    module.bias.requires_grad_(True)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    target = torch.randn(*shape[:-1], 9)

    ((module(x) - target) ** 2).sum().backward()
    ((reference(x_ref) - target) ** 2).sum().backward()

    assert module.weight.grad is None  # the dense gradient is never formed
    torch.testing.assert_close(delta(module).grad, reference.weight.grad.view(-1)[idx])
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(module.bias.grad, reference.bias.grad)


def test_small_steps_take_one_gather_with_the_same_sums():
    torch.manual_seed(0)
    g, x = torch.randn(2, 9, 6), torch.randn(2, 9, 8)
    flat = torch.sort(torch.randperm(48)[:13]).values
    rows, cols = flat // 8, flat % 8
    dense = torch.einsum("...o,...i->oi", g, x)[rows, cols]
    small = sparse_weight_grad(g, x, rows, cols, pattern=selection_pattern(rows, cols, (6, 8)))
    torch.testing.assert_close(small, dense)


def test_chunked_gather_matches_unchunked(monkeypatch):
    import gem.core.sparse_linear as sl

    monkeypatch.setattr(sl, "SMALL_TOKENS", 0)
    torch.manual_seed(0)
    g, x = torch.randn(3, 11, 6), torch.randn(3, 11, 8)
    rows, cols = torch.randint(0, 6, (17,)), torch.randint(0, 8, (17,))
    full = sparse_weight_grad(g, x, rows, cols)
    chunked = sparse_weight_grad(g, x, rows, cols, max_elements=17 * 4)  # 4 tokens per chunk
    dense = torch.einsum("...o,...i->oi", g, x)[rows, cols]
    torch.testing.assert_close(full, dense)
    torch.testing.assert_close(chunked, dense)


def test_sampled_product_matches_gather_and_dense(monkeypatch):
    import gem.core.sparse_linear as sl

    monkeypatch.setattr(sl, "SMALL_TOKENS", 0)  # these shapes would otherwise take the small-step gather
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


@pytest.mark.parametrize("kernel", ["small-step gather", "sampled product", "chunked gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_against_a_float64_reference(monkeypatch, kernel, dtype):
    """Each path of the k sums, with fp32, bf16 and fp16 activations, against float64 sums of the same inputs."""
    import gem.core.sparse_linear as sl

    tokens = 40 if kernel == "small-step gather" else 300
    monkeypatch.setattr(sl, "SMALL_TOKENS", 64)
    torch.manual_seed(0)
    g, x = torch.randn(tokens, 24).to(dtype), torch.randn(tokens, 32).to(dtype)
    flat = torch.sort(torch.randperm(24 * 32)[:50]).values
    rows, cols = flat // 32, flat % 32
    pattern = selection_pattern(rows, cols, (24, 32)) if kernel == "sampled product" else None
    got = sparse_weight_grad(g, x, rows, cols, pattern=pattern,
                             max_elements=50 * 7 if kernel == "chunked gather" else sl.MAX_GATHER_ELEMENTS)
    want = (g.double().T @ x.double())[rows, cols]
    assert got.dtype == torch.float32  # accumulated in fp32 whatever the activations
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_pattern_follows_loaded_indices_and_survives_copies():
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(8, 6)
    module = GemLinear(linear, "default", random_indices(linear, 7, gen))
    other = GemLinear(nn.Linear(8, 6), "default", random_indices(linear, 7, gen))
    module(torch.randn(2, 8)).sum().backward()  # builds and caches the pattern
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.geometry("default").pattern.col_indices(), other.geometry("default").cols)
    clone = copy.deepcopy(module)
    x = torch.randn(3, 8)
    clone(x).sum().backward()
    other(x).sum().backward()
    torch.testing.assert_close(delta(clone).grad, delta(other).grad)


def test_bias_frozen_by_default_and_no_grad_for_it():
    model = wrap(nn.Sequential(nn.Linear(4, 3)), {"0": torch.tensor([0, 5])})
    model(torch.randn(2, 4)).sum().backward()
    layer = dict(gem_modules(model))["base_model.model.0"]
    assert layer.bias.grad is None and delta(layer).grad is not None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.model.0.gem_delta.default"]


# --- training with AdamW ------------------------------------------------------------------------


def run_adamw(model: nn.Module, loss_fn, steps: int = 4) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()
    return optimizer


def assert_sparse_training_invariants(model, original, layers, optimizer):
    total_k = sum(indices(m).numel() for m in layers.values())
    state_numel = sum(s[key].numel() for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    assert state_numel == 2 * total_k  # (a)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(delta(m)) for m in layers.values()}
    original_modules = dict(original.named_modules())
    for layer in layers.values():
        layer.materialize()  # the weight is rewritten at each forward; the last step is not yet in it
    for name, layer in layers.items():
        w0 = original_modules[name].weight.detach().view(-1)
        w = layer.weight.detach().view(-1)
        idx = indices(layer)
        unselected = torch.ones_like(w, dtype=torch.bool)
        unselected[idx] = False
        assert torch.equal(w[unselected], w0[unselected])  # (b) bit-identical
        assert not torch.equal(w[idx], w0[idx])  # (c)
        assert torch.equal(w[idx], (w0[idx].float() + delta(layer).float()).to(w.dtype))
        assert torch.equal(layer.gem_base_values["default"], w0[idx])
    # the frozen rest of the model is untouched as well
    trained = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
               for k, v in model.state_dict().items()}
    for n, p0 in original.state_dict().items():
        if not any(n.startswith(name + ".") for name in layers):
            assert torch.equal(trained[n], p0), n


def test_mlp_adamw_state_and_frozen_entries():
    model, x, y = mlp(), torch.randn(6, 12), torch.randn(6, 5)
    original = copy.deepcopy(model)
    model, layers = inject_random(model, ["0", "2"], k=10)
    loss_fn = lambda m: ((m(x) - y) ** 2).mean()  # noqa: E731
    optimizer = run_adamw(model, loss_fn)
    assert_sparse_training_invariants(model, original, layers, optimizer)

    # (d) after training: the delta gradient equals the dense gradient of a plain merged copy
    reference = copy.deepcopy(model).merge_and_unload()
    dense = dense_reference_grads(reference, ["0", "2"], loss_fn)
    model.zero_grad()
    loss_fn(model).backward()
    for name, layer in layers.items():
        torch.testing.assert_close(delta(layer).grad, dense[name].view(-1)[indices(layer)])


def test_tiny_bert_query_value_adamw():
    model = tiny_bert()
    original = copy.deepcopy(model)
    names = targets(model, ("query", "value"))
    assert len(names) == 4
    model, layers = inject_random(model, names, k=25)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    loss_fn = lambda m: m(input_ids=ids).last_hidden_state.pow(2).mean()  # noqa: E731
    optimizer = run_adamw(model, loss_fn, steps=3)
    assert_sparse_training_invariants(model, original, layers, optimizer)

    reference = copy.deepcopy(model).merge_and_unload()
    dense = dense_reference_grads(reference, names, loss_fn)
    model.zero_grad()
    loss_fn(model).backward()
    for name, layer in layers.items():
        torch.testing.assert_close(delta(layer).grad, dense[name].view(-1)[indices(layer)])
    keys = model.state_dict().keys()
    assert "base_model.model.encoder.layer.0.attention.self.query.base_layer.weight" in keys
    assert "base_model.model.encoder.layer.0.attention.self.query.gem_delta.default" in keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_and_cpu_autocast(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8).to(dtype)
    reference = copy.deepcopy(linear).float()
    idx = random_indices(linear, 30, torch.Generator().manual_seed(0))
    module = GemLinear(linear, "default", idx)
    x = torch.randn(4, 3, 16).to(dtype)
    out = module(x)
    assert out.dtype == dtype
    out.float().pow(2).sum().backward()
    assert delta(module).dtype == torch.float32 and delta(module).grad.dtype == torch.float32
    reference.weight.requires_grad_(True)
    reference(x.float()).pow(2).sum().backward()
    torch.testing.assert_close(delta(module).grad, reference.weight.grad.view(-1)[idx], rtol=3e-2, atol=3e-2)
    torch.optim.AdamW([delta(module)], lr=1e-2, weight_decay=0.1).step()
    module(x)  # writes the half-precision-rounded new values
    assert not torch.equal(module.weight.view(-1)[idx], module.gem_base_values["default"])

    # fp32 weights under CPU autocast: bf16 forward, fp32 gradients
    fp32 = GemLinear(nn.Linear(16, 8), "default", idx)
    x32 = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32(x32)
    assert y.dtype == torch.bfloat16
    # the input is saved for backward as the matmul reads it (bf16), as nn.Linear under autocast saves it
    assert y.grad_fn.saved_tensors[0].dtype == torch.bfloat16
    y.float().sum().backward()
    assert x32.grad.dtype == torch.float32 and delta(fp32).grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = nn.Linear(16, 8)(x32)
    assert plain.grad_fn._saved_mat1.dtype == torch.bfloat16  # the floor it matches


def test_conv1d_layer_matches_its_dense_gradient():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(7, 5)  # weight [in=5, out=7]
    reference = copy.deepcopy(conv)
    idx = random_indices(conv, 9, torch.Generator().manual_seed(2))
    layer = GemLinear(conv, "default", idx)
    assert layer.transposed and (layer.in_features, layer.out_features) == (5, 7)
    x = torch.randn(2, 3, 5)
    out = layer(x)
    torch.testing.assert_close(out, reference(x))
    out.pow(2).sum().backward()
    reference.weight.requires_grad_(True)
    reference(x).pow(2).sum().backward()
    torch.testing.assert_close(delta(layer).grad, reference.weight.grad.view(-1)[idx])


# --- options, helpers, errors ------------------------------------------------------------------------


def test_init_w0_starts_at_twice_w0():
    linear = nn.Linear(6, 4)
    w0 = linear.weight.detach().clone().view(-1)
    idx = torch.tensor([1, 7, 20])
    module = GemLinear(linear, "default", idx, delta_init="w0")
    module(torch.randn(1, 6))
    torch.testing.assert_close(module.weight.view(-1)[idx], 2 * w0[idx])
    torch.testing.assert_close(module.base_weight(), w0.view(4, 6))


def test_state_dict_round_trip_and_unload():
    model, x = mlp(), torch.randn(3, 12)
    base = copy.deepcopy(model)
    w0 = base[0].weight.detach().clone()
    model, layers = inject_random(model, ["0", "2"], k=8)
    with torch.no_grad():
        for layer in layers.values():
            delta(layer).normal_()
    expected = model(x)
    fresh, _ = inject_random(copy.deepcopy(base), ["0", "2"], k=8)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)
    with fresh.disable_adapter():
        assert torch.equal(fresh(x), base(x))  # the base model's outputs, bit for bit
    assert torch.equal(fresh(x), expected)
    assert sorted(layers) == ["0", "2"]

    unloaded = model.unload()  # the plain base model: W0 again
    assert type(unloaded[0]) is nn.Linear and torch.equal(unloaded[0].weight, w0)
    assert torch.equal(unloaded(x), base(x))
    merged = fresh.merge_and_unload()  # W0 + delta folded in
    assert type(merged[0]) is nn.Linear and torch.equal(merged(x), expected)


def test_two_forwards_before_backward_do_not_break_autograd():
    module = GemLinear(nn.Linear(4, 3), "default", torch.tensor([0, 3, 9]))
    x = torch.randn(2, 4)
    loss = module(x).sum() + module(x).sum()
    loss.backward()
    assert delta(module).grad is not None


@pytest.mark.parametrize(
    "indices_by_name, message",
    [
        ({"0": torch.tensor([0, 12 * 16])}, "out of range"),
        ({"0": torch.tensor([3, 1, 3])}, "not unique"),
        ({"0": torch.tensor([0.5])}, "integer tensor"),
    ],
)
def test_bad_indices_name_the_problem(indices_by_name, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        wrap(model, indices_by_name)


def test_indices_are_sorted_and_a_second_adapter_switches():
    model, x = mlp(), torch.randn(3, 12)
    base_out = model(x).detach()
    wrapped = wrap(model, {"0": torch.tensor([9, 2, 5])})
    layer = dict(gem_modules(wrapped))["base_model.model.0"]
    assert indices(layer).tolist() == [2, 5, 9]
    with torch.no_grad():
        delta(layer).fill_(0.5)
    first = wrapped(x).detach()
    second = GemConfig(target_modules=["0"], budgets={"0": 2}, indices={"0": torch.tensor([2, 40])})
    wrapped.add_adapter("other", second)
    with torch.no_grad():
        layer.gem_delta["other"].fill_(-1.0)
    assert torch.equal(wrapped(x), first)  # still the first adapter
    wrapped.set_adapter("other")
    other = wrapped(x).detach()
    assert not torch.equal(other, first) and not torch.equal(other, base_out)
    wrapped.set_adapter("default")
    assert torch.equal(wrapped(x), first)
    with wrapped.disable_adapter():
        assert torch.equal(wrapped(x), base_out)
