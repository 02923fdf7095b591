"""The one interface every fine-tuning method implements.

A method turns a pre-trained model into one where only its own parameters train,
says how many entries it tunes, builds the optimizer's parameter groups and saves
and reloads exactly what trained. The task head that an encoder needs (the newly
initialised classifier) trains with every method and is counted apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_PREFIX_KEY = "head_parameter_names"
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


class MethodError(ValueError):
    """A method cannot be applied as configured; the message says how to fix it."""


class Method:
    """Base class. Subclasses override `prepare` and `is_method_parameter`."""

    name: str = "base"

    trains = True  # False: nothing trains (zero_shot); the run only scores dev and test
    # The AdamW the training glue builds over `optimizer_param_groups` (GEM: one flat update).
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        # One name given as a string (`model.target_modules=query`) is a list of one, not of letters.
        self.target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
        self.options = options
        # Names of the newly initialised task-head parameters (set by `prepare`).
        self.head_parameter_names: set[str] = set()

    # --- preparing the model -------------------------------------------------
    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        """Freeze / wrap / inject; return the model to train (may be a new wrapper)."""
        self.head_parameter_names = set(head_parameter_names)
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.head_parameter_names or self.is_method_parameter(name))
        return model

    def is_method_parameter(self, name: str) -> bool:
        """Whether a (non-head) parameter of the prepared model belongs to the method."""
        raise NotImplementedError

    # --- counting --------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def head_count(self, model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if self._is_head(n))

    def tuned_count(self, model: nn.Module) -> int:
        """Entries the method tunes, the task head excluded."""
        return sum(p.numel() for n, p in self.trainable_parameters(model) if not self._is_head(n))

    def _is_head(self, name: str) -> bool:
        # Inside a peft model (LoRA, GEM) the untouched head is `original_module` and its trained
        # copy sits under `modules_to_save.<adapter>`; only the trained copy is the head.
        if ".original_module." in name:
            return False
        name = _MODULES_TO_SAVE.sub(".", name)
        return name in self.head_parameter_names or any(name.endswith("." + h) for h in self.head_parameter_names)

    # --- optimisation ------------------------------------------------------------
    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on biases and norms (the usual convention)."""
        decay, no_decay = [], []
        for name, param in self.trainable_parameters(model):
            (no_decay if param.ndim <= 1 or "norm" in name.lower() else decay).append(param)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    # --- saving only what trained ------------------------------------------------
    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.trainable_parameters(model)}

    def load_saved(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise MethodError(
                f"{self.name}: checkpoint holds {len(missing)} tensors the model does not have "
                f"(first: {missing[0]!r}); was it saved for another model or method?"
            )
        with torch.no_grad():
            for n, t in state.items():
                if params[n].shape != t.shape:
                    raise MethodError(f"{self.name}: shape mismatch for {n}: {tuple(t.shape)} vs {tuple(params[n].shape)}")
                params[n].copy_(t)

    def save(self, model: nn.Module, directory: str | Path, extra_config: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_to_save(model), str(directory / "trained.safetensors"))
        config = {"method": self.name, "target_modules": self.target_modules, **self.options,
                  HEAD_PREFIX_KEY: sorted(self.head_parameter_names), **(extra_config or {})}
        (directory / "method_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """Put a saved checkpoint into a model prepared by this method; the model to use (may be a new wrapper)."""
        path = Path(directory) / "trained.safetensors"
        if not path.exists():
            raise MethodError(f"{self.name}: no checkpoint at {path}")
        self.load_saved(model, load_checkpoint_file(path, self.name))
        return model

    def merged_model(self, model: nn.Module) -> nn.Module:
        """A plain Hugging Face model with what trained folded in, for `save_pretrained`."""
        return model

    def describe(self) -> dict:
        """Settings recorded in the run record."""
        return {"name": self.name, "target_modules": self.target_modules, **self.options}


def load_checkpoint_file(path: str | Path, method_name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A saved safetensors file's tensors; a truncated or corrupt file is a MethodError naming it."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise MethodError(f"{method_name}: the checkpoint file {path} is corrupt or truncated ({error}); "
                          f"copy it again in full, or rerun with save_checkpoint=true to write a new one") from error


def find_target_linears(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Linear]:
    """Linear layers whose name ends with one of `target_modules` (PEFT's convention).

    Raises a clear error when any target name matches nothing, so a typo in a model config
    (`[query, valu]`) or a model without the target projections never trains silently with
    fewer matrices than asked for.
    """
    targets = list(target_modules)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    found = {name: module for name, module in linears.items() if any(matches(name, t) for t in targets)}
    unmatched = [t for t in targets if not any(matches(name, t) for name in linears)]
    if not targets or unmatched:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise MethodError(
            f"target modules {unmatched or targets} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {linear_names}. Set model.target_modules (or "
            f"method.target_modules) to the right names."
        )
    return found
