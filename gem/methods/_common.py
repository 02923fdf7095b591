"""Helpers shared by the baseline methods (option checking, locating blocks and heads)."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from torch import nn

from .base import MethodError

_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


def merge_options(method_name: str, defaults: Mapping, options: Mapping) -> dict:
    """Defaults overlaid with `options`; an unknown option is an error naming the known ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise MethodError(
            f"{method_name}: unknown option(s) {unknown}; the options of {method_name} are {sorted(defaults)}"
        )
    return {**defaults, **options}


def in_block(module_name: str) -> bool:
    """Whether a module lives inside a numbered block (`...layers.3...`, `...layer.0...`, `...h.11...`)."""
    return bool(_BLOCK_INDEX.search(module_name))


def matches_suffix(module_name: str, suffixes: Iterable[str]) -> bool:
    return any(module_name == s or module_name.endswith("." + s) for s in suffixes)


def head_module_names(model: nn.Module, head_parameter_names: Iterable[str]) -> list[str]:
    """The smallest set of modules holding exactly the head parameters.

    Starting from each head parameter's owner, climb while the parent's parameters are all
    head parameters (RoBERTa's `classifier.dense` + `classifier.out_proj` become `classifier`).
    """
    heads = set(head_parameter_names)
    if not heads:
        return []
    all_params = dict(model.named_parameters())
    missing = sorted(heads - set(all_params))
    if missing:
        raise MethodError(f"head parameters {missing} are not parameters of {type(model).__name__}")
    modules: set[str] = set()
    for name in heads:
        if "." not in name:
            raise MethodError(f"head parameter {name!r} sits on the model root; put the head in a submodule")
        path = name.rsplit(".", 1)[0]
        while "." in path:
            parent = path.rsplit(".", 1)[0]
            parent_params = {f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_parameters()}
            if not parent_params <= heads:
                break
            path = parent
        modules.add(path)
    return sorted(m for m in modules if not any(m.startswith(o + ".") for o in modules))


def output_embedding_names(model: nn.Module) -> set[str]:
    """Module names of the LM output projection (excluded from new biases / adapters)."""
    out = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except (NotImplementedError, AttributeError):
            out = None
    names = {n for n, m in model.named_modules() if out is not None and m is out}
    names |= {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    return names
