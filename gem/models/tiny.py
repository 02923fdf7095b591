"""Tiny random-init models with real tokenizers, for fast unit and integration tests.

NEVER use these for results: their weights are random. They exist so the whole pipeline
(data -> tokenizer -> model -> method -> training -> evaluation) runs in seconds.

* ``tiny:bert``  - BERT, hidden 32, 2 layers, the MiniLM tokenizer (vocab 30522), ~1M params.
* ``tiny:llama`` - LLaMA, hidden 32, 2 layers, tied embeddings, the SmolLM2 tokenizer
  (vocab 49152, so the embedding dominates: ~1.6M params).
* ``tiny:opt``   - OPT, hidden 32, 2 layers, tied embeddings, the SmolLM2 tokenizer.

Each is built deterministically from a seed, saved once into
``<gem cache>/tiny/<name>-seed<seed>-<hash>`` (with its tokenizer) and then loaded through
``load_model`` like any other checkpoint, so head detection etc. behave as for real models.
Use the ``*_CFG`` model configs (``pretrained: tiny:<name>``) with ``load_model``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from gem.models.loading import load_model
from gem.models.packaged import (
    MARKER_NAME,
    SOURCE_RESOLVERS,
    ModelLoadError,
    build_folder_atomically,
    gem_cache_root,
    minilm_path,
    read_marker,
    smollm2_path,
)

TINY_VERSION = 1

# Architecture of each tiny model (transformers config kwargs).
TINY_SPECS: dict[str, dict] = {
    "bert": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "llama": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    "opt": {
        "model_type": "opt",
        "vocab_size": 49152,
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}

TINY_BERT_CFG = {
    "name": "tiny-bert",
    "pretrained": "tiny:bert",
    "kind": "encoder",
    "target_modules": ["query", "value"],
    "max_length": 128,
    "trust_remote_code": False,
    "seed": 0,
}
TINY_LLAMA_CFG = {
    "name": "tiny-llama",
    "pretrained": "tiny:llama",
    "kind": "decoder",
    "target_modules": ["q_proj", "v_proj"],
    "max_length": 256,
    "trust_remote_code": False,
    "seed": 0,
}
TINY_OPT_CFG = {
    "name": "tiny-opt",
    "pretrained": "tiny:opt",
    "kind": "decoder",
    "target_modules": ["q_proj", "v_proj"],
    "max_length": 256,
    "trust_remote_code": False,
    "seed": 0,
}
TINY_MODEL_CFGS = {"tiny-bert": TINY_BERT_CFG, "tiny-llama": TINY_LLAMA_CFG, "tiny-opt": TINY_OPT_CFG}


def _spec_hash(name: str, seed: int) -> str:
    blob = json.dumps({"name": name, "seed": seed, "spec": TINY_SPECS[name], "v": TINY_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def tiny_config(name: str):
    from transformers import AutoConfig

    if name not in TINY_SPECS:
        raise ModelLoadError(f"Unknown tiny model {name!r}; use one of {sorted(TINY_SPECS)}.")
    spec = dict(TINY_SPECS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _build_tiny_base(name: str, seed: int):
    """The random base checkpoint: BertModel (pooler included, like MiniLM) or a causal LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(name)
    cls = AutoModel if name == "bert" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config, dtype=torch.float32)
    return model.eval()


def _tiny_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path() if name == "bert" else smollm2_path())


def tiny_checkpoint(name: str, seed: int = 0) -> str:
    """Folder of the tiny ``name`` model (bert / llama / opt) for ``seed``, building it once."""
    if name not in TINY_SPECS:
        raise ModelLoadError(f"Unknown tiny model 'tiny:{name}'; use one of tiny:{', tiny:'.join(TINY_SPECS)}.")
    digest = _spec_hash(name, seed)
    target = gem_cache_root() / "tiny" / f"{name}-seed{seed}-{digest}"

    def is_valid(folder: Path) -> bool:
        marker = read_marker(folder)
        return (
            marker is not None
            and marker.get("hash") == digest
            and (folder / "config.json").is_file()
            and (folder / "tokenizer_config.json").is_file()
        )

    def build(tmp: Path) -> dict:
        tokenizer = _tiny_tokenizer(name)
        model = _build_tiny_base(name, seed)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        return {"tiny": name, "seed": seed, "hash": digest, "note": "random weights: tests only"}

    if is_valid(target):
        return str(target)
    return str(build_folder_atomically(target, build, is_valid))


SOURCE_RESOLVERS["tiny:"] = lambda name, cfg: tiny_checkpoint(name, seed=int(cfg.get("seed") or 0))


def _load_seeded(model_cfg: dict, task_kind: str, num_labels: int, label_names=None, seed: int = 0):
    cfg = dict(model_cfg, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # also makes the new head's initialisation reproducible
        return load_model(cfg, task_kind, num_labels, label_names)


def tiny_bert(num_labels: int = 2, seed: int = 0, task_kind: str | None = None, label_names=None):
    """Tiny BERT with a task head (a ``LoadedModel``): classification for num_labels >= 2,
    regression for 1, or ``task_kind="multiple_choice"``. MiniLM tokenizer."""
    if task_kind is None:
        task_kind = "regression" if num_labels == 1 else "classification"
    return _load_seeded(TINY_BERT_CFG, task_kind, num_labels, label_names, seed)


def tiny_llama_causal_lm(seed: int = 0):
    """Tiny LLaMA causal LM (a ``LoadedModel``) with the real SmolLM2 tokenizer."""
    return _load_seeded(TINY_LLAMA_CFG, "generation", 0, None, seed)


def tiny_opt_causal_lm(seed: int = 0):
    """Tiny OPT causal LM (a ``LoadedModel``) with the SmolLM2 tokenizer."""
    return _load_seeded(TINY_OPT_CFG, "generation", 0, None, seed)


__all__ = [
    "TINY_BERT_CFG",
    "TINY_LLAMA_CFG",
    "TINY_OPT_CFG",
    "TINY_MODEL_CFGS",
    "TINY_SPECS",
    "MARKER_NAME",
    "tiny_bert",
    "tiny_checkpoint",
    "tiny_config",
    "tiny_llama_causal_lm",
    "tiny_opt_causal_lm",
]
