"""Houlsby bottleneck adapters (Houlsby et al. 2019), written here (no `adapters` package).

Two adapters per block: on the attention output projection and on the feed-forward output
projection, i.e. on the sublayer output BEFORE the residual add and the LayerNorm (Houlsby
placement). Each adapter is `h + up(relu(down(h)))` with `down: H -> b`, `up: b -> H`
(bottleneck `b`, option `bottleneck`, default 8); `up` is zero-initialised (weight and
bias), so a freshly prepared model computes exactly what the original does; `down` draws
from N(0, 0.02) with zero bias (option `init_std`).

The adapter wraps the output linear itself (`LinearWithAdapter`), so for BERT it acts on
`dense(x)` before the sublayer's dropout (Houlsby's figure puts it after; with dropout off
at evaluation and the adapter starting at identity this ordering is immaterial). The
wrapped linear's parameters become `<name>.linear.weight` / `.bias` (frozen), the
adapter's `<name>.adapter.down.*` / `.up.*`. Only adapters and the task head train and
are saved; loading needs the model prepared first, then `load`.

Where the adapters go: option `adapter_modules` (module-name suffixes) or, by default, the
family table `ADAPTER_MODULES` keyed by `config.model_type` (an unknown family falls back
to the first table row that matches modules inside the blocks).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ._common import head_module_names, in_block, matches_suffix, merge_options, output_embedding_names
from .base import Method, MethodError

_BERT = ("attention.output.dense", "output.dense")  # BertSelfOutput.dense, BertOutput.dense
_OPT = ("self_attn.out_proj", "fc2")
_LLAMA = ("self_attn.o_proj", "mlp.down_proj")
_PHI = ("self_attn.dense", "mlp.fc2")

ADAPTER_MODULES: dict[str, tuple[str, ...]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "camembert": _BERT, "electra": _BERT,
    "deberta": _BERT, "deberta-v2": _BERT,
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "opt": _OPT,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "phi": _PHI,
}


class BottleneckAdapter(nn.Module):
    """`h + up(relu(down(h)))`; `up` starts at zero, so the adapter starts as the identity."""

    def __init__(self, hidden: int, bottleneck: int, init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        self.act = nn.ReLU()
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class LinearWithAdapter(nn.Module):
    """A frozen linear followed by a bottleneck adapter on its output."""

    def __init__(self, linear: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    # Code that introspects the projection (`proj.weight.dtype`, `proj.out_features`) still works.
    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


class HoulsbyAdapter(Method):
    name = "adapter"
    DEFAULTS = {"bottleneck": 8, "adapter_modules": "auto", "init_std": 0.02}

    def merged_model(self, model: nn.Module) -> nn.Module:
        raise MethodError("Houlsby adapters are non-linear (ReLU bottlenecks) and cannot be folded into the base "
                          "weights; load the run's checkpoint with gem.methods (HoulsbyAdapter.prepare + load) instead")

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, self.DEFAULTS, options))
        if int(self.options["bottleneck"]) < 1:
            raise MethodError(f"adapter: bottleneck must be >= 1, got {self.options['bottleneck']}")
        self._adapter_parameter_names: set[str] = set()
        self.wrapped: list[str] = []

    def is_method_parameter(self, name: str) -> bool:
        return name in self._adapter_parameter_names

    def _find(self, model: nn.Module, head_modules: list[str]) -> dict[str, nn.Linear]:
        excluded = output_embedding_names(model)
        candidates = {
            n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and in_block(n) and n not in excluded
            and not any(n == h or n.startswith(h + ".") for h in head_modules)
        }
        spec = self.options["adapter_modules"]
        if spec is None or spec == "auto":
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            tables = [ADAPTER_MODULES[model_type]] if model_type in ADAPTER_MODULES else list(dict.fromkeys(ADAPTER_MODULES.values()))
        else:
            tables = [[spec] if isinstance(spec, str) else list(spec)]
        for suffixes in tables:
            found = {n: m for n, m in candidates.items() if matches_suffix(n, suffixes)}
            if found:
                return found
        names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        if any(isinstance(m, LinearWithAdapter) for m in model.modules()):
            raise MethodError("adapter: the model already carries adapters; prepare a fresh model")
        raise MethodError(
            f"adapter: no output projection found in {type(model).__name__} for adapter_modules={spec!r}; "
            f"the linear layers inside its blocks are named {names}. Set the option adapter_modules "
            f"to the attention-output and feed-forward-output names (e.g. ['self_attn.o_proj', 'mlp.down_proj'])."
        )

    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        heads = set(head_parameter_names)
        found = self._find(model, head_module_names(model, heads))
        b, std = int(self.options["bottleneck"]), float(self.options["init_std"])
        for name, linear in found.items():
            w = linear.weight
            wrapper = LinearWithAdapter(linear, BottleneckAdapter(linear.out_features, b, std, dtype=w.dtype, device=w.device))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        self.wrapped = sorted(found)
        self._adapter_parameter_names = {
            f"{name}.adapter.{p}" for name in self.wrapped for p, _ in model.get_submodule(name).adapter.named_parameters()
        }
        return super().prepare(model, heads)

    def describe(self) -> dict:
        out = super().describe()
        out["adapters"] = len(self.wrapped)
        return out
