"""Model sources (packaged / Hub / tiny test models) and loading for a task.

See ``packaged`` (MiniLM, SmolLM2 and Gemma 3 270M from pip packages, GGUF conversion,
``resolve_model_source``), ``loading`` (``load_model`` -> ``LoadedModel``) and ``tiny``
(random tiny models for tests only).
"""

from gem.models.loading import (LoadedModel, fit_max_length, load_model, model_max_positions, new_parameter_names,
                                normalize_task_kind)
from gem.models.packaged import (
    ModelLoadError,
    convert_gemma3,
    convert_smollm2,
    gem_cache_root,
    gemma3_cache_dir,
    gemma3_path,
    minilm_path,
    model_kind,
    resolve_model_source,
    smollm2_cache_dir,
    smollm2_gguf_path,
    smollm2_path,
)
from gem.models import tiny  # noqa: E402,F401  (registers the `tiny:` model source)

__all__ = [
    "LoadedModel",
    "fit_max_length",
    "model_max_positions",
    "ModelLoadError",
    "convert_gemma3",
    "convert_smollm2",
    "gem_cache_root",
    "gemma3_cache_dir",
    "gemma3_path",
    "load_model",
    "minilm_path",
    "model_kind",
    "new_parameter_names",
    "normalize_task_kind",
    "resolve_model_source",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "smollm2_path",
]
