"""The method contract, one table of cases: every method on every tiny model family.

Each case runs one tester: prepare (and select, for the sparse methods) -> counts -> one
optimizer step -> only the method's parameters moved -> save and load into a fresh model ->
the merged model gives the trained logits -> the merged model survives `save_pretrained` /
`from_pretrained` as a plain Hugging Face model. A combination the framework does not support
asserts its named refusal instead (adapters do not fold; zero-shot never steps and refuses a
new head). Models are random-init tiny configs of five families: BERT (a new classification
head), LLaMA, OPT, GPT-2 (Conv1D weights) and Phi (causal LMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from gem.methods import MethodError, build_method, merge_for_export, method_options

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

V = 100  # vocabulary of every tiny family
CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]  # the "pre-trained" model: fixed random weights
    targets: tuple[str, ...]
    head: tuple[str, ...] = ()      # parameters a task adds (and every method trains)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=2))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64))


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64))


FAMILIES = {
    "bert": Family(_bert, ("query", "value"), ("classifier.weight", "classifier.bias")),
    "llama": Family(_llama, ("q_proj", "v_proj")),
    "opt": Family(_opt, ("q_proj", "v_proj")),
    "gpt2": Family(_gpt2, ("c_attn",)),
    "phi": Family(_phi, ("q_proj", "v_proj")),
}
METHODS = ["full", "bitfit", "lora", "adapter", "gem", "gem_uniform", "grad_uniform", "grad_entropy", "fish", "pafi",
           "random_mask", "zero_shot"]
# (method, family or "*") -> (stage, the refusal's message): where the tester must stop, and how
REFUSALS = {
    ("adapter", "*"): ("merge", "cannot be folded"),
    ("bitfit", "llama"): ("merge", "biases this architecture does not have"),  # LLaMA's linears have none
    # GPT-2 keeps its weights in Conv1D; LoRA and the adapters here look for nn.Linear (GEM takes both)
    ("lora", "gpt2"): ("prepare", "match no linear layer"),
    ("adapter", "gpt2"): ("prepare", "no output projection found"),
    ("zero_shot", "bert"): ("prepare", "untrained task head"),
    ("zero_shot", "*"): ("step", "nothing trains"),
}
CASES = [(m, f) for m in METHODS for f in FAMILIES]


def pretrained(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family].build().eval()


@cache
def method_config(name: str) -> dict:
    """The method's options as `conf/method/<name>.yaml` composes them (the sparse ablations are yaml only)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"method={name}"])
    return method_options(cfg.method)


def make_method(name: str, family: str):
    options = dict(method_config(name))
    if "density" in options:  # tiny matrices: a density that gives every target matrix entries
        options.update(density=0.01, min_per_matrix=4)
    return build_method(name, list(FAMILIES[family].targets), **options)


def batch_for(family: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (4, 9), generator=gen)
    labels = torch.tensor([0, 1, 1, 0]) if FAMILIES[family].head else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def refusal(method: str, family: str) -> tuple[str, str] | None:
    return REFUSALS.get((method, family)) or REFUSALS.get((method, "*"))


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def moved_outside_mask(model: nn.Module, name: str, before: torch.Tensor) -> int:
    """How many entries of a frozen tensor changed where no method may write (GEM: off its entries)."""
    changed = (model.get_parameter(name).detach() != before).view(-1)
    owner = name.removesuffix(".base_layer.weight")
    if owner != name:
        from gem.tuner import GemLinear

        layer = model.get_submodule(owner)
        if isinstance(layer, GemLinear):
            changed[layer.gem_indices["default"]] = False
    return int(changed.sum())


@pytest.mark.parametrize("method_name, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_method_contract(method_name, family, tmp_path):
    spec, batch, refused = FAMILIES[family], batch_for(family), refusal(method_name, family)
    method = make_method(method_name, family)

    # prepare (and select): the method's parameters train, and the new head, nothing else
    if refused and refused[0] == "prepare":
        with pytest.raises(MethodError, match=refused[1]):
            method.prepare(pretrained(family), spec.head)
        return
    model = method.prepare(pretrained(family), spec.head)
    if getattr(method, "selects_entries", False):
        model = method.select(model, [batch, batch])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(pretrained(family).get_parameter(n).numel() for n in spec.head)
    tuned = method.tuned_count(model)
    if not method.trains:
        assert refused and refused[0] == "step" and trainable == tuned == 0
        assert method.optimizer_param_groups(model, 0.0) == []  # the runner then says: nothing trains
        return
    assert tuned > 0 and trainable == tuned + head
    if getattr(method, "selects_entries", False):
        assert 0 < tuned <= method.total_budget

    # one step moves the method's parameters and nothing frozen (GEM writes only its own entries)
    base_logits = logits(model, batch)
    frozen = frozen_snapshot(model)
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = method.optimizer_class(method.optimizer_param_groups(model, 0.01), lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    trained = logits(model, batch)
    assert not torch.equal(trained, base_logits)
    assert {n: moved_outside_mask(model, n, t) for n, t in frozen.items()} == {n: 0 for n in frozen}
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[n])]
    assert any(method.is_method_parameter(n) for n in moved)

    # save -> a fresh model (its new head initialised differently) -> load: the trained logits
    method.save(model, tmp_path / "saved")
    fresh_method = make_method(method_name, family)
    torch.manual_seed(99)
    fresh = fresh_method.prepare(pretrained(family), spec.head)
    fresh = fresh_method.load(fresh, tmp_path / "saved").eval()
    assert fresh_method.tuned_count(fresh) == tuned
    assert torch.equal(logits(fresh, batch), trained)

    # a PEFT model (GEM and its ablations, LoRA): with the adapter off, the model before the step
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            assert torch.equal(logits(model, batch), base_logits)
        assert torch.equal(logits(model, batch), trained)

    # merge -> a plain Hugging Face model with the same logits, through save_pretrained
    if refused and refused[0] == "merge":
        with pytest.raises(MethodError, match=refused[1]):
            merge_for_export(method.merged_model(model))
        return
    merged = merge_for_export(method.merged_model(model)).eval()
    assert not any(("lora_" in n or "gem_" in n) for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "hf")
    exported = type(merged).from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(exported, batch), logits(merged, batch))


def test_every_method_and_family_is_in_the_table():
    from gem.methods import METHODS as REGISTERED

    yaml_methods = {p.stem for p in (CONF / "method").glob("*.yaml")}
    assert set(METHODS) | {"gem_lm"} == yaml_methods  # gem_lm: a gradient-pass option, tested in test_decoder
    assert set(REGISTERED) <= set(METHODS)
