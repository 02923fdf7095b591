"""BitFit (Ben Zaken et al. 2022): only bias terms train, plus the task head.

Every existing bias parameter trains (attention q/k/v/out, feed-forward, LayerNorm, and
any other bias the model has, e.g. Phi's `lm_head.bias`). A model whose linears or norms
have no bias (LLaMA-style) gets new zero-initialised biases first, so the prepared model
computes exactly what the original did:

* linears: option `new_bias_modules` (module-name suffixes, PEFT style). Default `"auto"`:
  every `nn.Linear` inside a numbered transformer block that has no bias, excluding the LM
  output projection and the task head (for LLaMA: q/k/v/o/gate/up/down_proj). `[]` adds none.
  The new bias is a plain `Linear.bias` parameter, so its name is `<module>.bias`.
* norms (option `norm_biases`, default True): every affine norm module (class name
  containing "Norm") without a bias, block norms and the final norm alike. A norm that has
  an empty `bias` slot (`nn.LayerNorm(bias=False)`) gets it filled; one that has none
  (RMSNorm) gets a registered `bias` parameter and a forward hook adding it to the output.

Saving writes the trained biases and the head; loading needs the model prepared first
(which re-creates the new biases), then `load`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ._common import head_module_names, in_block, matches_suffix, merge_options, output_embedding_names
from .base import Method, MethodError


def _add_norm_bias(module: nn.Module, args, output):
    return output + module.bias.to(output.dtype)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter) and weight.ndim == 1


def _lacks_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is None


class BitFit(Method):
    name = "bitfit"
    DEFAULTS = {"new_bias_modules": "auto", "norm_biases": True}

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, self.DEFAULTS, options))
        self.added_biases: list[str] = []

    def is_method_parameter(self, name: str) -> bool:
        return name == "bias" or name.endswith(".bias")

    def _new_bias_linears(self, model: nn.Module, head_modules: list[str]) -> dict[str, nn.Linear]:
        spec = self.options["new_bias_modules"]
        excluded = output_embedding_names(model)

        def is_head(n: str) -> bool:
            return any(n == h or n.startswith(h + ".") for h in head_modules)

        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_head(n)}
        if spec is None or spec == "auto":
            return {n: m for n, m in linears.items() if in_block(n) and n not in excluded and _lacks_bias(m)}
        if isinstance(spec, str):
            spec = [spec]
        spec = list(spec)
        if not spec:
            return {}
        chosen = {n: m for n, m in linears.items() if matches_suffix(n, spec)}
        if not chosen:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise MethodError(
                f"bitfit: new_bias_modules {spec} match no linear layer of {type(model).__name__}; "
                f"its linear layers are named {names}. Fix the option, or use 'auto'."
            )
        return {n: m for n, m in chosen.items() if _lacks_bias(m)}

    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        heads = set(head_parameter_names)
        head_modules = head_module_names(model, heads)
        added = []
        for name, linear in self._new_bias_linears(model, head_modules).items():
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device))
            added.append(name)
        if self.options["norm_biases"]:
            for name, norm in list(model.named_modules()):
                if not _is_norm(norm) or not _lacks_bias(norm):
                    continue
                if any(name == h or name.startswith(h + ".") for h in head_modules):
                    continue
                w = norm.weight
                bias = nn.Parameter(torch.zeros_like(w))
                if "bias" in norm._parameters:  # an empty slot the module's own forward uses
                    norm.bias = bias
                else:
                    norm.register_parameter("bias", bias)
                    norm.register_forward_hook(_add_norm_bias)
                added.append(name)
        self.added_biases = added
        return super().prepare(model, heads)

    def merged_model(self, model: nn.Module) -> nn.Module:
        if self.added_biases:
            raise MethodError(f"bitfit added {len(self.added_biases)} biases this architecture does not have "
                              f"(e.g. {self.added_biases[0]}); a plain Hugging Face model of this class cannot hold "
                              f"them. Load the run's checkpoint with gem.methods (BitFit.prepare + load) instead")
        return model

    def describe(self) -> dict:
        out = super().describe()
        out["added_biases"] = len(self.added_biases)
        return out
