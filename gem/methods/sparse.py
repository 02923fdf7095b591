"""GEM and every sparse ablation in run.py: a `GemConfig`, its selection, and the PEFT tuner.

The method is the library's code driven by the run: `gem.select_entries` chooses the entries
(called by the training glue's callback once the data is there), `peft.get_peft_model` wraps
the model in `GemLinear` layers, and the run saves a PEFT adapter. Named ablations
(`gem_uniform`, `fish`, ...) are config files under conf/method/ that set `score` and
`budget`; they run this class under their own name (`base: gem`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from gem.core.flat_adamw import FlatAdamW

from ._common import head_module_names
from .base import HEAD_PREFIX_KEY, Method, MethodError

# GemConfig fields a run sets through `method.<key>` (the rest are PEFT's or written by the selection).
OPTIONS = ("density", "score", "budget", "num_grad_samples", "eps", "min_per_matrix", "delta_init", "threshold",
           "verify_untouched", "gradient_pass_mode", "gradient_pass_loss")


def _tuner():
    import gem.tuner  # imported lazily: registers GEM with peft (which `import gem` does not need)

    return gem.tuner


class SparseMask(Method):
    """Train only the selected entries, k = floor(density * N_model) in all, of the target matrices."""

    name = "gem"
    selects_entries = True  # the training glue runs `select` before the first step
    optimizer_class = FlatAdamW  # K deltas in dozens of small tensors: one update, not one per matrix

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise MethodError(f"{self.name}: unknown option(s) {unknown}; the options of {self.name} are "
                              f"{sorted(OPTIONS)}")
        tuner = _tuner()
        try:
            self.config = tuner.GemConfig(target_modules=self.target_modules or None, **options)
        except tuner.GemConfigError as error:
            raise MethodError(f"{self.name}: {error}") from None
        self.options = {key: getattr(self.config, key) for key in OPTIONS}
        self.selection = None

    @property
    def needs_gradients(self) -> bool:
        return self.config.score_rule.needs_gradients

    @property
    def selected(self) -> bool:
        return self.config.selected

    @property
    def total_budget(self) -> int:
        return self.config.total_budget or 0

    @property
    def budgets(self) -> dict[str, int]:
        return dict(self.config.budgets)

    # --- preparing: freeze everything; the entries are chosen later, with data ----------------
    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        tuner = _tuner()
        self.head_parameter_names = set(head_parameter_names)
        self.config.modules_to_save = head_module_names(model, self.head_parameter_names) or None
        causal = type(model).__name__.endswith("ForCausalLM")
        self.config.task_type = "CAUSAL_LM" if causal else None
        if self.config.gradient_pass_loss == "lm" and not causal:
            raise MethodError(f"{self.name}: method.gradient_pass_loss=lm (the LM loss over prompt + answer) needs a "
                              f"decoder model; {type(model).__name__} has a task head: use gradient_pass_loss=task")
        try:  # fail now, not after the gradient pass: targets that match nothing, an impossible density
            layers = tuner.select.target_layers(model, self.config)
            num_parameters = sum(p.numel() for p in model.parameters())
            from gem.core.budgets import total_budget

            self.config.total_budget = total_budget(float(self.config.density), num_parameters,
                                                    sum(m.weight.numel() for m in layers.values()))
            self.config.num_model_parameters = num_parameters
        except (tuner.GemConfigError, ValueError) as error:
            raise MethodError(f"{self.name}: {error}") from None
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def is_method_parameter(self, name: str) -> bool:
        return ".gem_delta." in name

    def target_weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        tuner = _tuner()
        return {name: m.weight for name, m in tuner.select.target_layers(model, self.config).items()}

    # --- selection: the library's entry point, then the PEFT wrapper ----------------------------
    def select(self, model: nn.Module, batches=None, loss_fn=None, *, seed: int = 0, device=None,
               loss_scale: float = 1.0) -> nn.Module:
        """Choose the entries (gradient pass when the score needs one) and return the wrapped model."""
        tuner = _tuner()
        self.config.seed = int(seed)
        try:
            self.selection = tuner.select_entries(model, self.config, batches, loss_fn, device=device,
                                                  loss_scale=loss_scale)
        except tuner.GemConfigError as error:
            raise MethodError(f"{self.name}: {error}") from None
        return self._wrap(model)

    def restore(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
        """Wrap the model with entries chosen before (a resumed run's checkpoint), without a new selection."""
        self.config.indices = {name: idx for name, idx in masks.items()}
        self.config.budgets = {name: int(idx.numel()) for name, idx in masks.items()}
        return self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.config)

    # --- counting and optimisation ----------------------------------------------------------------
    def tuned_count(self, model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if self.is_method_parameter(n))

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        # Weight decay on a delta pulls it back toward W0 (never toward zero weights); the
        # head follows the base convention (no decay on biases).
        deltas = [p for n, p in model.named_parameters() if p.requires_grad and self.is_method_parameter(n)]
        head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not self.is_method_parameter(n)]
        groups = [{"params": deltas, "weight_decay": weight_decay}] if deltas else []
        decay = [p for n, p in head if p.ndim > 1]
        no_decay = [p for n, p in head if p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": weight_decay}] if decay else []
        groups += [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
        return groups

    def merged_model(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()  # plain layers with W0 + delta folded in

    # --- saving: a PEFT adapter (indices + values, budgets in its config) ------------------------------
    def save(self, model: nn.Module, directory: str | Path, extra_config: dict | None = None) -> Path:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise MethodError(f"{self.name}: save expects the model returned by select (a peft model)")
        directory = Path(directory)
        model.peft_config["default"].base_model_name_or_path = (extra_config or {}).get("base_model")
        model.save_pretrained(str(directory), save_embedding_layers=False)  # GEM never tunes embeddings
        config = {**self.describe(), HEAD_PREFIX_KEY: sorted(self.head_parameter_names), **(extra_config or {}),
                  **adapter_file_sizes(directory, self.tuned_count(model))}
        (directory / "method_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """A prepared fresh base model with the saved adapter (trainable, to continue training or test)."""
        from peft import PeftModel

        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            raise MethodError(f"{self.name}: no PEFT adapter at {directory} (adapter_config.json is missing)")
        from safetensors import SafetensorError

        try:
            wrapped = PeftModel.from_pretrained(model, str(directory), is_trainable=True)
        except _tuner().GemConfigError as error:
            raise MethodError(f"{self.name}: {error}") from None
        except (SafetensorError, OSError, RuntimeError) as error:
            raise MethodError(f"{self.name}: {directory / 'adapter_model.safetensors'} is corrupt or truncated "
                              f"({error}); copy it again in full, or rerun with save_checkpoint=true") from error
        self.config = wrapped.peft_config["default"]
        return wrapped

    def describe(self) -> dict:
        return {**super().describe(), "total_budget": self.total_budget,
                "num_model_parameters": self.config.num_model_parameters or 0}


def adapter_file_sizes(directory: str | Path, tuned: int) -> dict:
    """Bytes of a saved GEM adapter: the index + value payload per tuned entry, the safetensors
    header, and the head (modules_to_save) apart."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    payload = head = 0
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            size = int(torch.Size(tensor.get_shape()).numel()) * _dtype_bytes(tensor.get_dtype())
            if ".gem_" in key:
                payload += size
            else:
                head += size
    header = path.stat().st_size - payload - head
    return {"bytes_per_tuned_entry": payload / max(1, tuned), "adapter_header_bytes": header,
            "adapter_head_bytes": head}


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}[name]


