"""Zero-shot: the pre-trained model as it is, the reference row of prompt-based tables.

Nothing trains and no optimizer is built: the run scores the dev set once (for the record and
the table's dev column) and then the test set, with the same prompts and candidate scoring as
the trained methods. Only for models that need no new head (decoders with prompts): an
encoder's classifier head starts random, and scoring it says nothing about the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ._common import merge_options
from .base import Method, MethodError


class ZeroShot(Method):
    name = "zero_shot"
    trains = False

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, {}, options))

    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        heads = sorted(head_parameter_names)
        if heads:
            raise MethodError(f"zero_shot scores the pre-trained model as it is, but this model has a new, untrained "
                              f"task head ({heads[0]}, ...) that only training would make meaningful. Use a decoder "
                              f"with prompts (e.g. model=smollm2-135m), whose candidates the language model scores")
        return super().prepare(model, ())

    def is_method_parameter(self, name: str) -> bool:
        return False

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return []

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def load_saved(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise MethodError(f"zero_shot trains nothing, so it has nothing to load (got {len(state)} tensors)")

    def save(self, model: nn.Module, directory: str | Path, extra_config: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"method": self.name, "trained": "nothing: the base model as it is", **(extra_config or {})}
        (directory / "method_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        return model
