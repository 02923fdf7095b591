"""Model sources (packaged / Hub / tiny test models) and loading for a task.

See ``packaged`` (MiniLM and SmolLM2 from pip packages, SmolLM2 GGUF conversion,
``resolve_model_source``), ``loading`` (``load_model`` -> ``LoadedModel``) and ``tiny``
(random tiny models for tests only).
"""

from gem.models.loading import LoadedModel, load_model, new_parameter_names, normalize_task_kind
from gem.models.packaged import (
    ModelLoadError,
    convert_smollm2,
    gem_cache_root,
    minilm_path,
    model_kind,
    resolve_model_source,
    smollm2_cache_dir,
    smollm2_gguf_path,
    smollm2_path,
)

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "convert_smollm2",
    "gem_cache_root",
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
