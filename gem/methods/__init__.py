"""Fine-tuning methods behind one interface (`base.Method`) and their registry.

`build_method("lora", ["query", "value"], r=8)` or `build_method({"name": "lora", "r": 8,
"target_modules": [...]})` (a plain dict or an OmegaConf DictConfig) returns a `Method`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .adapter import BottleneckAdapter, HoulsbyAdapter, LinearWithAdapter
from .base import Method, MethodError, find_target_linears
from .bitfit import BitFit
from .full import FullFineTuning
from .lora import LoRA, merge_for_export
from .sparse import SPARSE_METHODS, SparseMask

METHODS: dict[str, type[Method]] = {
    "full": FullFineTuning,
    "bitfit": BitFit,
    "lora": LoRA,
    "adapter": HoulsbyAdapter,
    # GEM and its ablations: gem, gem_uniform, grad_uniform, grad_entropy, random_mask, fish, pafi.
    **SPARSE_METHODS,
}


def register_method(name: str, cls: type[Method]) -> None:
    METHODS[name] = cls


def _as_dict(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def build_method(name_or_cfg: str | Mapping, target_modules: Iterable[str] | None = None, **options) -> Method:
    """A method by name (or a config with a `name` key and its options)."""
    if isinstance(name_or_cfg, str):
        name = name_or_cfg
    else:
        cfg = _as_dict(name_or_cfg)
        if "name" not in cfg:
            raise MethodError(f"method config {cfg} has no 'name'; known methods: {sorted(METHODS)}")
        name = cfg.pop("name")
        cfg_targets = cfg.pop("target_modules", None)
        if target_modules is None:
            target_modules = cfg_targets
        options = {**cfg, **options}
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name](target_modules, **options)


__all__ = [
    "METHODS", "Method", "MethodError", "build_method", "register_method", "find_target_linears",
    "FullFineTuning", "BitFit", "LoRA", "HoulsbyAdapter", "BottleneckAdapter", "LinearWithAdapter",
    "merge_for_export", "SparseMask",
]
