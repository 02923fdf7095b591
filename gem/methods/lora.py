"""LoRA (Hu et al. 2022) through `peft`, on the same q/v projections as GEM.

`prepare` wraps the model in a `peft.PeftModel` (LoraConfig r=8, lora_alpha=16,
lora_dropout=0.0, bias="none", target_modules = the method's target modules). The task
head is given to peft as `modules_to_save`, so it trains and is saved with the adapter;
inside the wrapper its trained copy is named `...classifier.modules_to_save.default.weight`
and the frozen original `...classifier.original_module.weight` (the latter is not counted).
`task_type` option: "auto" (CAUSAL_LM for `*ForCausalLM` models, none otherwise), or any
peft TaskType name, or None.

`save` writes peft's own format (`adapter_model.safetensors` + `adapter_config.json`) and
`method_config.json`; `load` puts a saved adapter into a model prepared with the same
settings. `merge_for_export` folds LoRA into the base weights (`merge_and_unload`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from torch import nn

from ._common import head_module_names, merge_options
from .base import _MODULES_TO_SAVE, HEAD_PREFIX_KEY, Method, MethodError, find_target_linears, load_checkpoint_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    import peft  # imported lazily: only LoRA needs it

    return peft


class LoRA(Method):
    name = "lora"
    DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "task_type": "auto"}

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, self.DEFAULTS, options))

    def is_method_parameter(self, name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def merged_model(self, model: nn.Module) -> nn.Module:
        return merge_for_export(model)

    def _task_type(self, model: nn.Module):
        task_type = self.options["task_type"]
        if task_type == "auto":
            return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
        return task_type

    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        peft = _peft()
        if isinstance(model, peft.PeftModel):
            raise MethodError("lora: the model is already a peft model; prepare a fresh base model")
        if not self.target_modules:
            raise MethodError("lora: no target_modules; set them to the model's q/v projection names (e.g. ['q_proj', 'v_proj'])")
        find_target_linears(model, self.target_modules)  # clear error when the names match nothing
        self.head_parameter_names = set(head_parameter_names)
        head_modules = head_module_names(model, self.head_parameter_names)
        config = peft.LoraConfig(
            r=int(self.options["r"]),
            lora_alpha=self.options["lora_alpha"],
            lora_dropout=float(self.options["lora_dropout"]),
            target_modules=list(self.target_modules),
            modules_to_save=head_modules or None,
            bias="none",
            task_type=self._task_type(model),
        )
        wrapped = peft.get_peft_model(model, config)
        for name, param in wrapped.named_parameters():
            param.requires_grad_(self._is_head(name) or self.is_method_parameter(name))
        trained_heads = {_MODULES_TO_SAVE.sub(".", n) for n, p in wrapped.named_parameters() if p.requires_grad and self._is_head(n)}
        missing = sorted(h for h in self.head_parameter_names if not any(n.endswith("." + h) for n in trained_heads))
        if missing:
            raise MethodError(f"lora: head parameters {missing} were not found in the peft model")
        return wrapped

    # --- saving in peft's own format ---------------------------------------------
    def save(self, model: nn.Module, directory: str | Path, extra_config: dict | None = None) -> Path:
        peft = _peft()
        if not isinstance(model, peft.PeftModel):
            raise MethodError("lora: save expects the model returned by prepare (a peft model)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory))
        config = {"method": self.name, "target_modules": self.target_modules, **self.options,
                  HEAD_PREFIX_KEY: sorted(self.head_parameter_names), **(extra_config or {})}
        (directory / "method_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        peft = _peft()
        if not isinstance(model, peft.PeftModel):
            raise MethodError("lora: load expects a model prepared by this method (prepare the fresh base model first)")
        path = Path(directory) / ADAPTER_WEIGHTS
        if not path.exists():
            raise MethodError(f"lora: no adapter at {path}")
        result = peft.set_peft_model_state_dict(model, load_checkpoint_file(path, self.name))
        if result.unexpected_keys:
            raise MethodError(
                f"lora: the adapter at {path} holds {len(result.unexpected_keys)} tensors the model does not have "
                f"(first: {result.unexpected_keys[0]!r}); was it saved for another model or settings?"
            )
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        not_loaded = sorted(trained & set(result.missing_keys))
        if not_loaded:
            raise MethodError(f"lora: the adapter at {path} lacks {len(not_loaded)} trained tensors (first: {not_loaded[0]!r})")
        return model


def merge_for_export(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and drop the peft wrapper (head included); other models pass through."""
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    return model
