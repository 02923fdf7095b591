"""Full fine-tuning: every parameter trains; `tuned_count` is all parameters minus the task head."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ._common import merge_options
from .base import Method


class FullFineTuning(Method):
    name = "full"
    DEFAULTS: dict = {}

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, self.DEFAULTS, options))

    def is_method_parameter(self, name: str) -> bool:
        return True

    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        return super().prepare(model, head_parameter_names)
