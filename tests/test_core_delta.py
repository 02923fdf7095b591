"""SparseDelta checkpoint: compact round trip, apply to a fresh base, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from gem.core.delta import DeltaError, SparseDelta, decode_indices, encode_indices, fingerprint_model
from gem.core.sparse_linear import inject_sparse_deltas

METADATA = {"base_model_name": "tiny-bert-test", "density": 0.001, "selection": {"score": "ratio", "budget": "entropy"}}


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def qv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(("query", "value"))]


@pytest.fixture(scope="module")
def trained():
    """A tiny BERT with sparse deltas trained for a few AdamW steps, and its fresh base."""
    model = tiny_bert()
    base = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    indices = {n: torch.sort(torch.randperm(32 * 32, generator=gen)[: 20 + 5 * i]).values
               for i, n in enumerate(qv_names(model))}
    for p in model.parameters():
        p.requires_grad_(False)
    modules = inject_sparse_deltas(model, indices)
    optimizer = torch.optim.AdamW([m.delta for m in modules.values()], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 50, (2, 6), generator=gen)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    return model, base, ids


def synthetic(indices: torch.Tensor, shape=(384, 384)) -> SparseDelta:
    values = torch.randn(indices.numel())
    return SparseDelta({"m": indices}, {"m": values}, {"m": shape}, dict(METADATA), fingerprint="0" * 64)


def test_index_coding_round_trip_with_escapes():
    idx = torch.tensor([0, 1, 65535, 65536 + 65535, 200_000, 200_001, 3_000_000])
    gaps, large = encode_indices(idx)
    assert gaps.dtype == torch.uint16 and large.dtype == torch.uint32
    assert large.numel() == 3  # gaps 65536, 68929 and 2799999 escape to uint32
    assert torch.equal(decode_indices(gaps, large), idx)


def test_round_trip_equality(trained, tmp_path):
    model, _, _ = trained
    delta = SparseDelta.from_model(model, METADATA)
    delta.save(tmp_path)
    loaded = SparseDelta.load(tmp_path)
    assert loaded.names == delta.names and loaded.shapes == delta.shapes
    for n in delta.names:
        assert torch.equal(loaded.indices[n], delta.indices[n])
        assert torch.equal(loaded.values[n], delta.values[n])
    assert loaded.fingerprint == delta.fingerprint
    assert loaded.config["selection"] == METADATA["selection"]
    config = json.loads((tmp_path / "delta_config.json").read_text())
    assert config["base_model_name"] == "tiny-bert-test"
    assert [m["budget"] for m in config["matrices"]] == [20, 25, 30, 35]


def test_bytes_per_entry_realistic_case(tmp_path):
    idx = torch.sort(torch.randperm(384 * 384, generator=torch.Generator().manual_seed(0))[:1000]).values
    delta = synthetic(idx)
    assert delta.bytes_per_entry() == 6.0  # 2 bytes index + 4 bytes fp32 value
    delta.save(tmp_path)
    file_bytes = SparseDelta.file_bytes_per_entry(tmp_path)
    print(f"realistic: {delta.bytes_per_entry():.3f} B/entry data, {file_bytes:.3f} B/entry with header")
    assert file_bytes < 6.25  # a constant header of ~150 bytes over 1000 entries
    assert torch.equal(SparseDelta.load(tmp_path).indices["m"], idx)


def test_bytes_per_entry_pathological_spread_uses_fallback(tmp_path):
    idx = torch.arange(100_000, 2048 * 2048, 100_000)[:40]  # every gap >= 65536: all escaped
    delta = synthetic(idx, shape=(2048, 2048))
    print(f"pathological: {delta.bytes_per_entry():.3f} B/entry")
    assert delta.bytes_per_entry() == 10.0  # 2 (escape) + 4 (uint32 gap) + 4 (value)
    delta.save(tmp_path)
    assert torch.equal(SparseDelta.load(tmp_path).indices["m"], idx)


@pytest.mark.parametrize("inject", [False, True], ids=["merge", "inject"])
def test_apply_to_fresh_model_gives_identical_outputs(trained, tmp_path, inject):
    model, base, ids = trained
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    SparseDelta.from_model(model, METADATA).save(tmp_path)
    fresh = copy.deepcopy(base)
    SparseDelta.load(tmp_path).apply(fresh, inject=inject)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, expected)


def test_fingerprint_covers_base_weights_not_deltas(trained):
    model, base, _ = trained
    names = qv_names(base)
    assert fingerprint_model(model, names) == fingerprint_model(base, names)  # W0 reconstructed
    assert fingerprint_model(copy.deepcopy(base).to(torch.bfloat16), names) == fingerprint_model(base, names)


def test_fingerprint_mismatch_raises(trained, tmp_path):
    model, _, _ = trained
    SparseDelta.from_model(model, METADATA).save(tmp_path)
    other = tiny_bert(seed=1)
    with pytest.raises(DeltaError, match="made for base model 'tiny-bert-test'.*load the base model named in"):
        SparseDelta.load(tmp_path).apply(other)
    # an already merged model counts as "another base" too (guards against double application)
    _, base, _ = trained
    merged = SparseDelta.load(tmp_path).apply(copy.deepcopy(base))
    with pytest.raises(DeltaError, match="fingerprint"):
        SparseDelta.load(tmp_path).apply(merged)


def test_corrupt_files_raise_clear_errors(trained, tmp_path):
    model, _, _ = trained
    SparseDelta.from_model(model, METADATA).save(tmp_path)
    tensors = tmp_path / "sparse_delta.safetensors"
    good = tensors.read_bytes()

    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(DeltaError, match="corrupt"):
        SparseDelta.load(tmp_path)

    tensors.write_bytes(good[: len(good) // 2])
    with pytest.raises(DeltaError, match="corrupt"):
        SparseDelta.load(tmp_path)

    tensors.write_bytes(good)
    (tmp_path / "delta_config.json").write_text("{not json")
    with pytest.raises(DeltaError, match="corrupt"):
        SparseDelta.load(tmp_path)

    with pytest.raises(DeltaError, match="missing"):
        SparseDelta.load(tmp_path / "nowhere")


def test_shape_mismatch_and_missing_module(trained):
    model, _, _ = trained
    delta = SparseDelta.from_model(model, METADATA)
    name = delta.names[0]
    wrong_shape = SparseDelta({name: delta.indices[name]}, {name: delta.values[name]}, {name: (32, 16)}, METADATA)
    with pytest.raises(DeltaError, match="shape mismatch"):
        wrong_shape.apply(tiny_bert(), check_fingerprint=False)
    with pytest.raises(DeltaError, match="has no module"):
        delta.apply(nn.Sequential(nn.Linear(4, 4)), check_fingerprint=False)
