"""FlatAdamW: the same bits as torch's per-tensor AdamW, one update per group."""

import copy

import pytest
import torch

from gem.core.flat_adamw import FlatAdamW

SIZES = [70, 3, 129, 1, 513]  # lengths that land on and off the vector width


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    deltas = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
    head = [torch.nn.Parameter(torch.randn(4, 5, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
    return deltas, head


def groups(deltas, head):
    return [{"params": deltas, "weight_decay": 0.01}, {"params": head, "weight_decay": 0.0}]


def train(cls, steps: int, *, resume_at: int | None = None, skip_grad_at: int | None = None, **kwargs):
    deltas, head = make_params()
    optimizer = cls(groups(deltas, head), lr=1e-3, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in deltas + head:  # gradients over several orders of magnitude
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** float(torch.randint(-6, 2, (), generator=gen))
        if step == skip_grad_at:
            deltas[1].grad = None  # a module unused this step: AdamW leaves it (and its state) alone
        optimizer.step()
        optimizer.zero_grad()
        if step == resume_at:  # a checkpoint round trip: new parameter objects, a loaded state dict
            state = copy.deepcopy(optimizer.state_dict())
            values = [p.detach().clone() for p in deltas + head]
            deltas, head = make_params(seed=5)
            with torch.no_grad():
                for p, v in zip(deltas + head, values):
                    p.copy_(v)
            optimizer = cls(groups(deltas, head), lr=1e-3, **kwargs)
            optimizer.load_state_dict(state)
    return torch.cat([p.detach().reshape(-1) for p in deltas + head]), optimizer


@pytest.mark.parametrize("case", [{}, {"resume_at": 6}, {"skip_grad_at": 4}, {"resume_at": 3, "skip_grad_at": 7}])
def test_bit_identical_to_per_tensor_adamw(case):
    want, reference = train(torch.optim.AdamW, 20, **case)
    got, flat = train(FlatAdamW, 20, **case)
    assert torch.equal(got, want)
    for (p_ref, s_ref), (p, s) in zip(reference.state.items(), flat.state.items()):
        assert torch.equal(s["exp_avg"], s_ref["exp_avg"]) and torch.equal(s["exp_avg_sq"], s_ref["exp_avg_sq"])
        assert float(s["step"]) == float(s_ref["step"])


def test_one_buffer_per_group_and_views_rebuilt_after_to():
    deltas, head = make_params()
    optimizer = FlatAdamW(groups(deltas, head), lr=1e-3)
    for p in deltas + head:
        p.grad = torch.ones_like(p)
    optimizer.step()
    storages = {p.untyped_storage().data_ptr() for p in deltas}
    assert len(storages) == 1  # every delta is a view of the group's buffer
    assert {optimizer.state[p]["exp_avg"].untyped_storage().data_ptr() for p in deltas} != storages
    # a move (here a dtype round trip) gives each parameter its own storage: the next step rebuilds
    for p in deltas:
        p.data = p.data.double().float()
    before = torch.cat([p.detach() for p in deltas])
    for p in deltas + head:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert len({p.untyped_storage().data_ptr() for p in deltas}) == 1
    assert not torch.equal(torch.cat([p.detach() for p in deltas]), before)


def test_grad_scaler_on_fused_cpu_matches_adamw():
    """torch.amp.GradScaler hands a fused optimizer the scale and the inf flag: they must be used."""
    def run(cls):
        deltas, head = make_params()
        optimizer = cls(groups(deltas, head), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for step in range(6):
            loss = sum((p * (i + 1)).sum() for i, p in enumerate(deltas + head))
            if step == 2:
                loss = loss * float("inf")  # an overflow step: skipped, the scale halves
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in deltas + head]), scaler.get_scale()

    (want, want_scale), (got, got_scale) = run(torch.optim.AdamW), run(FlatAdamW)
    assert got_scale == want_scale == 2.0 ** 9
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    start = torch.cat([p.detach().reshape(-1) for p in sum(make_params(), [])])
    assert not torch.equal(got, start)  # the five finite steps moved every parameter


def test_gem_trains_through_flat_adamw():
    import gem
    from gem.methods import build_method

    assert gem.FlatAdamW is FlatAdamW  # the library's name for it
    assert build_method("gem", ["query"]).optimizer_class is FlatAdamW
    assert build_method("lora", ["query"]).optimizer_class is torch.optim.AdamW


def test_gem_fp16_autocast_with_grad_scaler_leaves_every_other_entry_untouched():
    """GEM trained as a GPU run would be (fp16 autocast, GradScaler, fused FlatAdamW), here on the CPU:
    the deltas move, and every entry outside the mask is W0 bit for bit."""
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    import gem
    from gem.tuner import gem_modules

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=32, num_labels=2))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 60, (4, 9), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}
    config = gem.GemConfig(target_modules=["query", "value"], density=0.01, min_per_matrix=4, task_type="SEQ_CLS")
    gem.select_entries(model, config, [batch])
    model = get_peft_model(model, config)
    optimizer = FlatAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    moved = 0
    for name, layer in gem_modules(model):
        layer.materialize()
        weight = layer.base_layer.weight.detach().view(-1)
        before = w0[name.removeprefix("base_model.model.") + ".weight"].view(-1)
        off = torch.ones_like(weight, dtype=torch.bool)
        off[layer.gem_indices["default"]] = False
        assert torch.equal(weight[off], before[off]), name
        moved += int((weight[~off] != before[~off]).sum())
    assert moved > 0
