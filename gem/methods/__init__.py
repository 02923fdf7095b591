"""Fine-tuning methods behind one interface (`base.Method`) and their registry.

`build_method("lora", ["query", "value"], r=8)` or `build_method({"name": "lora", "r": 8,
"target_modules": [...]})` (a plain dict or an OmegaConf DictConfig) returns a `Method`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from gem.config import plain_dict

from .adapter import BottleneckAdapter, HoulsbyAdapter, LinearWithAdapter
from .base import Method, MethodError, find_target_linears
from .bitfit import BitFit
from .full import FullFineTuning
from .lora import LoRA, merge_for_export
from .sparse import SparseMask
from .zero_shot import ZeroShot

METHODS: dict[str, type[Method]] = {
    "full": FullFineTuning,
    "bitfit": BitFit,
    "lora": LoRA,
    "adapter": HoulsbyAdapter,
    "zero_shot": ZeroShot,
    # GEM; its ablations (gem_uniform, fish, ...) are conf/method/*.yaml files run under `base: gem`.
    "gem": SparseMask,
}


def register_method(name: str, cls: type[Method]) -> None:
    METHODS[name] = cls


def build_method(name_or_cfg: str | Mapping, target_modules: Iterable[str] | None = None, **options) -> Method:
    """A method by name (or a config with a `name` key and its options)."""
    if isinstance(name_or_cfg, str):
        name = name_or_cfg
    else:
        cfg = plain_dict(name_or_cfg)
        if "name" not in cfg:
            raise MethodError(f"method config {cfg} has no 'name'; known methods: {sorted(METHODS)}")
        name = cfg.pop("name")
        cfg_targets = cfg.pop("target_modules", None)
        if target_modules is None:
            target_modules = cfg_targets
        options = {**cfg, **options}
    base = options.pop("base", None)
    if name in METHODS:
        return METHODS[name](target_modules, **options)
    if base in METHODS:
        # a named variant from config alone (conf/method/<name>.yaml with `defaults: [gem, _self_]`
        # inherits `base: gem`): the base method's code under the variant's name, so records,
        # tables and checkpoints keep the two apart
        variant = type(f"{METHODS[base].__name__}_{name}", (METHODS[base],), {"name": name})
        return variant(target_modules, **options)
    raise MethodError(f"unknown method {name!r}; known methods: {sorted(METHODS)}. A variant of one of them "
                      f"from config alone names it in `base` (conf/method/gem.yaml's variants inherit base: gem); "
                      f"new code: gem.methods.register_method")


# Method-config keys that are run settings, not constructor options of the method.
RUN_KEYS = {"name", "lr", "target_modules"}


def method_options(method_cfg: Any) -> dict[str, Any]:
    """A run's `method` config without its run settings (name, lr, target_modules): the options."""
    return {k: v for k, v in plain_dict(method_cfg).items() if k not in RUN_KEYS}


def method_from_config(cfg: Any) -> Method:
    """The method a run config names (`cfg.method`; targets from it or from `cfg.model`), as run.py builds it."""
    targets = cfg.method.get("target_modules") or cfg.model.target_modules  # a list, or one name as a string
    return build_method(cfg.method.name, targets, **method_options(cfg.method))


__all__ = [
    "METHODS", "Method", "MethodError", "build_method", "method_from_config", "method_options", "register_method",
    "find_target_linears",
    "FullFineTuning", "BitFit", "LoRA", "HoulsbyAdapter", "BottleneckAdapter", "LinearWithAdapter",
    "merge_for_export", "SparseMask", "ZeroShot",
]
