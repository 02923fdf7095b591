"""`GemLinear`: a PEFT tuner layer that trains k selected entries of an nn.Linear or Conv1D weight.

Per adapter it holds `gem_delta` (the k trainable numbers, fp32), `gem_indices` (sorted flat
indices into the weight) and `gem_base_values` (W0 at those entries). The base layer's dense
weight is frozen and, before a forward, holds ``W0 + delta`` at the active adapter's entries
and W0 everywhere else (written in place, k entries; `gem.core.sparse_linear` says why). With
the adapters disabled, merged out or unloaded, the k entries go back to W0 bit for bit.
One adapter is applied at a time; others can be added and switched to with `set_adapter`.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from gem.core.sparse_linear import Geometry, SparseEntriesFunction, merged_values, validate_indices, write_entries


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (weight [in, out]); imported lazily so the layer does not need transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


class GemLinear(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("gem_delta",)
    other_param_names = ("gem_indices", "gem_base_values")

    def __init__(self, base_layer: nn.Module, adapter_name: str, indices: torch.Tensor, delta_init: str = "zero"):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(f"GEM tunes nn.Linear and GPT-2 Conv1D layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = is_conv1d(base_layer)  # Conv1D stores the weight as [in, out]
        weight = base_layer.weight
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.transposed else \
            (weight.shape[1], weight.shape[0])
        self.gem_delta = nn.ParameterDict({})
        self.gem_indices = BufferDict({}, persistent=True)
        self.gem_base_values = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        # (adapter, ...) whose entries the dense weight holds now; None: W0 everywhere
        self._written: tuple | None = None
        self._patterns: dict[str, tuple] = {}  # adapter -> (indices key, Geometry)
        self._plan: _Plan | None = None  # what the next forward needs, resolved once (see `forward`)
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(_after_load_hook)
        self.update_layer(adapter_name, indices, delta_init)

    # --- adapters --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, indices: torch.Tensor, delta_init: str = "zero") -> None:
        weight = self.base_layer.weight
        if not weight.is_contiguous():
            raise ValueError("GEM needs a contiguous weight (flat indices address weight.view(-1))")
        indices = validate_indices(adapter_name, indices, weight.numel()).to(weight.device)
        self._restore_base()  # base values are read from W0, never from another adapter's entries
        base = weight.detach().view(-1).index_select(0, indices)  # a new tensor, not a view
        self.gem_indices[adapter_name] = indices
        self.gem_base_values[adapter_name] = base
        start = base.float() if delta_init == "w0" else torch.zeros(base.shape, dtype=torch.float32,
                                                                    device=base.device)
        self.gem_delta[adapter_name] = nn.Parameter(start)
        weight.requires_grad_(False)
        self.set_adapter(self.active_adapters)

    @property
    def num_selected(self) -> int:
        adapter = self._applied_adapter()
        return self.gem_indices[adapter].numel() if adapter else 0

    def geometry(self, adapter: str) -> Geometry:
        """Rows, cols and CSR pattern of the adapter's entries in the stored weight's layout ([out, in],
        or [in, out] for Conv1D), built once per indices tensor (the backward needs all three)."""
        idx = self.gem_indices[adapter]
        key = (id(idx), idx.data_ptr(), idx._version, idx.device)
        cached = self._patterns.get(adapter)
        if cached is None or cached[0] != key:
            cached = (key, Geometry(idx, tuple(self.base_layer.weight.shape), self.transposed))
            self._patterns[adapter] = cached
        return cached[1]

    def _applied_adapter(self) -> str | None:
        """The adapter whose entries the forward uses: the active one unless adapters are disabled."""
        if self._disable_adapters:
            return None
        active = self._active_adapter
        if isinstance(active, str) or len(active) == 1:  # the common case, kept short: it runs every forward
            name = active if isinstance(active, str) else active[0]
            return name if name in self.gem_delta else None
        active = [a for a in active if a in self.gem_delta]
        if len(active) > 1:
            raise ValueError(f"GEM applies one adapter at a time, but {active} are active; choose one with "
                             f"model.set_adapter(name)")
        return active[0] if active else None

    # --- keeping the dense weight in step ---------------------------------------------------
    def _write(self, adapter: str | None) -> None:
        """Make the dense weight hold W0 + delta at `adapter`'s entries (None: W0 everywhere)."""
        if self._written is not None and self._written[0] != adapter:
            self._restore_base()
        if adapter is not None:
            weight = self.base_layer.weight
            delta = self.gem_delta[adapter].detach()  # the write is outside autograd
            write_entries(weight, self.gem_indices[adapter],
                          merged_values(self.gem_base_values[adapter], delta, weight.dtype))
            self._written = (adapter,)

    def _restore_base(self) -> None:
        self._plan = None
        if self._written is not None:
            adapter = self._written[0]
            if adapter in self.gem_indices:
                write_entries(self.base_layer.weight, self.gem_indices[adapter], self.gem_base_values[adapter])
            self._written = None

    def materialize(self) -> None:
        """Write the applied adapter's current delta into the weight (before reading `.weight` directly)."""
        self._write(self._applied_adapter())

    def base_weight(self) -> torch.Tensor:
        """A dense copy of W0 (the weight with every adapter's entries put back)."""
        w0 = self.base_layer.weight.detach().clone()
        if self._written is not None:
            adapter = self._written[0]
            w0.view(-1).index_copy_(0, self.gem_indices[adapter], self.gem_base_values[adapter].to(w0.dtype))
        return w0

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The hot path, once per target module per step: a host cost that small GPU steps pay in
        # full, so everything that does not change between steps is resolved once into a plan.
        plan = self._plan
        if plan is None or plan.state != (self._disable_adapters, self._active_adapter, self.merged_adapters) \
                or plan.weight.data_ptr() != plan.weight_ptr:
            plan = self._make_plan()
        delta = plan.delta
        if delta is None:  # merged, disabled, or no adapter of this layer active
            return self.base_layer(x, *args, **kwargs)
        values = plan.base + delta.detach() if plan.fp32 else merged_values(plan.base, delta.detach(), plan.dtype)
        plan.flat_weight.index_copy_(0, plan.indices, values)  # W0 + delta at k entries; see write_entries
        if delta.requires_grad and torch.is_grad_enabled():
            return SparseEntriesFunction.apply(x, plan.weight, plan.bias, delta, plan.geometry)
        return self.base_layer(x, *args, **kwargs)

    def _make_plan(self) -> _Plan:
        if self.merged and self._disable_adapters:
            self.unmerge()
        adapter = None if self.merged else self._applied_adapter()
        if not self.merged:
            self._write(adapter)
        weight = self.base_layer.weight
        plan = _Plan()
        plan.state = (self._disable_adapters, self._active_adapter, self.merged_adapters)
        plan.weight, plan.weight_ptr, plan.delta = weight, weight.data_ptr(), None
        if adapter is not None:
            plan.delta, plan.base, plan.indices = self.gem_delta[adapter], self.gem_base_values[adapter], \
                self.gem_indices[adapter]
            plan.flat_weight, plan.bias, plan.dtype = weight.data.view(-1), self.base_layer.bias, weight.dtype
            plan.fp32 = plan.base.dtype == plan.delta.dtype == weight.dtype == torch.float32
            plan.geometry = self.geometry(adapter)
        self._plan = plan
        return plan

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): tensors move, the plan goes
        self._plan = None
        return super()._apply(fn, recurse)

    # --- merging ---------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1:
            raise ValueError(f"GEM merges one adapter at a time (their entries may overlap), got {adapter_names}")
        adapter = adapter_names[0]
        self._write(adapter)
        if safe_merge and not bool(torch.isfinite(self.base_layer.weight).all()):
            self._restore_base()
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self._written = (adapter, "merged")  # frozen in: later changes to the delta are not followed
        self.merged_adapters.append(adapter)
        self._plan = None

    def unmerge(self) -> None:
        if self.merged:
            self._restore_base()
            self.merged_adapters = []

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None):
        """The plain base layer: W0 + the (active or named) adapter's delta if `merge`, else exactly W0."""
        if merge:
            if not self.merged:
                self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            self._restore_base()
        base = self.base_layer
        self._written = None  # the weight now belongs to the plain layer
        return base

    # --- state dicts -------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        if not self.merged:
            self.materialize()  # a saved full state dict holds the weight the forward uses
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # Runs before the children (delta, indices, base values, base layer) load: put W0 back at
        # the current entries, and remember which base values the state dict brings.
        if not self.merged:
            self._restore_base()
        self._pending_base = {a for a in self.gem_indices if f"{prefix}gem_base_values.{a}" in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                       error_msgs)

    def _after_load(self) -> None:
        """After a load: indices may have changed; base values a saved adapter omits are read from W0.

        A full state dict (a training checkpoint) brings the weight as the forward used it, with
        W0 + delta at one adapter's entries, and every adapter's base values: those go back first.
        """
        pending = getattr(self, "_pending_base", set())
        weight = self.base_layer.weight
        for adapter in list(self.gem_indices):
            self.gem_indices[adapter] = validate_indices(adapter, self.gem_indices[adapter],
                                                         weight.numel()).to(weight.device)
        for adapter in pending:
            write_entries(weight, self.gem_indices[adapter], self.gem_base_values[adapter])
        for adapter, indices in self.gem_indices.items():
            if adapter not in pending:
                self.gem_base_values[adapter] = weight.detach().view(-1).index_select(0, indices).clone()
        self._pending_base = set()
        self._written = None
        self._patterns = {}
        self._plan = None

    def delete_adapter(self, adapter_name: str) -> None:
        self._plan = None
        if self._written is not None and self._written[0] == adapter_name:
            self._restore_base()
        super().delete_adapter(adapter_name)

    def __getstate__(self):  # copies and pickles rebuild the CSR patterns instead of carrying them
        state = dict(super().__getstate__())
        state["_patterns"] = {}
        state["_plan"] = None
        return state

    def __repr__(self) -> str:
        return "gem." + super().__repr__()

    def extra_repr(self) -> str:
        sizes = {a: t.numel() for a, t in self.gem_indices.items()}
        return f"selected={sizes}, transposed={self.transposed}"


class _Plan:
    """A layer's forward, resolved: valid while `state` (disabled, active adapter, merged adapters)
    and the weight's storage stay the same; every method that changes more drops it."""

    __slots__ = ("state", "weight", "weight_ptr", "delta", "base", "indices", "flat_weight", "bias", "dtype",
                 "fp32", "geometry")


def _after_load_hook(module: GemLinear, incompatible_keys) -> None:
    module._after_load()


def gem_modules(model: nn.Module):
    """(name, GemLinear) for every GEM layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, GemLinear):
            yield name, module
