"""`GemModel`: the PEFT tuner that wraps the selected layers of a model in `GemLinear`.

`get_peft_model(model, config)` needs a config on which `gem.select_entries` has run (its
`indices` and `budgets`); `PeftModel.from_pretrained` builds the layers from the saved
budgets and then loads indices and values from `adapter_model.safetensors`. In that file
each matrix's indices are stored as uint16 gaps (+ uint32 escapes, `gem.core.delta`) next
to its fp32 values: 6 bytes per tuned entry.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from gem.core.delta import decode_indices, encode_indices, fingerprint
from gem.tuner.config import GemConfig, GemConfigError
from gem.tuner.layer import GemLinear, is_conv1d

PREFIX = "gem_"
_GAPS, _LARGE_GAPS, _INDICES, _BASE = "gem_gaps", "gem_large_gaps", "gem_indices", "gem_base_values"


class GemModel(BaseTuner):
    prefix: str = PREFIX
    tuner_layer_cls = GemLinear
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model, config: GemConfig, adapter_name: str) -> None:
        if not config.budgets:
            raise GemConfigError("this GemConfig has no selection yet: run gem.select_entries(model, config, batches) "
                                 "before get_peft_model (PeftModel.from_pretrained reads it from adapter_config.json)")
        if config.indices is None and config.base_fingerprint:  # loading a saved adapter onto a base model
            weights = {}
            for name in config.budgets:
                try:
                    weights[name] = _base_weight(model.get_submodule(name))
                except AttributeError:
                    raise GemConfigError(f"the model ({type(model).__name__}) has no module {name!r} that this GEM "
                                         f"adapter tunes; was it made for another architecture?") from None
            found = fingerprint(weights)
            if found != config.base_fingerprint:
                raise GemConfigError(
                    f"this GEM adapter was trained on base model {config.base_model_name_or_path!r} with fingerprint "
                    f"{config.base_fingerprint[:16]}...; the given model's target matrices differ ({found[:16]}...). "
                    f"Load the base model it names (or set base_fingerprint to null in adapter_config.json to apply "
                    f"it anyway)")

    def _create_and_replace(self, config: GemConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        budget = int(config.budgets.get(current_key, 0))
        if budget == 0:
            return  # the budget rule gave this matrix nothing: it stays a plain layer
        if config.indices is not None:
            if current_key not in config.indices:
                raise GemConfigError(f"the selection has a budget but no indices for {current_key!r}")
            indices = config.indices[current_key]
        else:  # loading: the saved indices replace these placeholders (same count)
            indices = torch.arange(budget)
        if isinstance(target, GemLinear):
            target.update_layer(adapter_name, indices, config.delta_init)
            return
        if isinstance(target, BaseTunerLayer):
            raise GemConfigError(f"{current_key!r} is already adapted by another PEFT method "
                                 f"({type(target).__name__}); GEM wraps plain nn.Linear or Conv1D layers")
        layer = GemLinear(target, adapter_name, indices, config.delta_init)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model, config: GemConfig, adapter_name: str) -> None:
        wrapped = {name for name, module in model.named_modules()
                   if isinstance(module, GemLinear) and adapter_name in module.gem_delta}
        missing = sorted(name for name, k in config.budgets.items() if k and name not in wrapped)
        if missing:
            raise GemConfigError(f"the GEM selection names {len(missing)} matrices that target_modules="
                                 f"{config.target_modules!r} does not reach in this model (first: {missing[0]!r})")
        config.indices = None  # from here on the layers own them (and the adapter file saves them)

    def _mark_only_adapters_as_trainable(self, model) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for module in model.modules():  # the entries' base values and indices are buffers; W0 stays frozen
            if isinstance(module, GemLinear):
                module.base_layer.weight.requires_grad_(False)

    # --- the adapter file: indices as gaps, values as fp32, no base values (read from W0 at load) ---
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        out = {}
        for key, value in selected.items():
            module, found, adapter = key.rpartition(f".{_INDICES}.")
            if found:
                gaps, large = encode_indices(value)
                out[f"{module}.{_GAPS}.{adapter}"] = gaps
                if large.numel():
                    out[f"{module}.{_LARGE_GAPS}.{adapter}"] = large
            elif f".{_BASE}." not in key:
                out[key] = value
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        layers = {name: module for name, module in model.named_modules() if isinstance(module, GemLinear)}
        for key in [k for k in state_dict if k.endswith(f".{_GAPS}")]:
            module = key[: -len(f".{_GAPS}")]
            indices = decode_indices(state_dict.pop(key), state_dict.pop(f"{module}.{_LARGE_GAPS}", None))
            state_dict[f"{module}.{_INDICES}"] = indices
            layer = layers.get(module) or layers.get(module.removeprefix("base_model.model."))
            if layer is not None:  # W0 at the saved entries, read from the fresh base weight
                layer._restore_base()
                weight = layer.base_layer.weight
                if indices.numel() and int(indices.max()) >= weight.numel():
                    raise GemConfigError(f"the adapter's indices for {module!r} exceed its weight's "
                                         f"{weight.numel()} entries: the file is corrupt or for another model")
                state_dict[f"{module}.{_BASE}"] = weight.detach().view(-1).index_select(0, indices.to(weight.device))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _base_weight(module) -> torch.Tensor:
    if isinstance(module, GemLinear):
        return module.base_weight()
    if isinstance(module, torch.nn.Linear) or is_conv1d(module):
        return module.weight
    raise GemConfigError(f"{type(module).__name__} is not an nn.Linear or Conv1D layer")


def read_adapter_entries(directory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (flat indices, fp32 deltas)} of a saved GEM adapter, read without a model."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    entries = {}
    for key, gaps in tensors.items():
        if key.endswith(f".{_GAPS}"):
            module = key[: -len(f".{_GAPS}")]
            indices = decode_indices(gaps, tensors.get(f"{module}.{_LARGE_GAPS}"))
            entries[module.removeprefix("base_model.model.")] = (indices, tensors[f"{module}.gem_delta"])
    return entries
