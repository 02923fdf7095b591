"""AdamW that updates each parameter group as one flat vector: one update for all of GEM's K deltas.

GEM trains K numbers spread over dozens of small delta tensors (one per target matrix). A
per-tensor AdamW pays its ten-odd tensor ops once per tensor, so on small steps the update
costs a host cost per module (about 20 us per module on one CPU core in the `--preset
dispatch` benchmark); a flat group pays them once per step.

A group's parameters become views of one flat buffer (`p.data` is re-pointed), and so do
their moments in `optimizer.state`, so checkpoints keep torch's per-parameter layout. Each
step concatenates the gradients and runs torch's own AdamW arithmetic on the buffer. AdamW is
elementwise, so every entry gets exactly the bits the per-tensor loop gives it (tested).
Whenever the views were broken (`model.to()`, `optimizer.load_state_dict`), the buffer is
rebuilt from the current values. A group it cannot flatten (a parameter without a gradient
this step, mixed dtypes or devices, amsgrad, maximize, differentiable, capturable) takes
the per-tensor step unchanged.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw


class _FlatGroup:
    """The flat buffers of one group: values, moments and the shared step counter."""

    def __init__(self, params: list[torch.Tensor], state: dict, fused: bool):
        self.params = list(params)
        self.all_flat = all(p.dim() == 1 for p in params)  # GEM's deltas: concatenated as they are
        first = params[0]
        values = torch.cat([p.detach().reshape(-1) for p in params])
        had = [state.get(p) or {} for p in params]
        if all("exp_avg" in s for s in had):  # moments from an earlier step or a loaded checkpoint
            self.exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in had])
            self.exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in had])
            self.step = had[0]["step"].clone()
        else:
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(values), torch.zeros_like(values)
            self.step = torch.zeros((), dtype=torch.float32, device=first.device) if fused else torch.tensor(0.0)
        self.values = values
        offset = 0
        self.value_views, self.avg_views = [], []
        for p in params:
            n = p.numel()
            p.data = values[offset:offset + n].view_as(p)
            avg = self.exp_avg[offset:offset + n].view_as(p)
            state[p] = {"step": self.step, "exp_avg": avg, "exp_avg_sq": self.exp_avg_sq[offset:offset + n].view_as(p)}
            self.value_views.append(p.data_ptr())
            self.avg_views.append(avg)
            offset += n

    @staticmethod
    def possible(params: list[torch.Tensor], state: dict) -> bool:
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device or p.is_complex() for p in params):
            return False
        had = [state.get(p) or {} for p in params]
        if any("exp_avg" in s for s in had):  # moments must be all there, with one step count
            if not all("exp_avg" in s for s in had):
                return False
            step = had[0]["step"]
            return all(bool(s["step"] == step) for s in had)
        return True

    def intact(self, params: list[torch.Tensor], state: dict) -> bool:
        """Whether the parameters and moments are still the views this group made."""
        if len(params) != len(self.params):
            return False
        for p, own, ptr, avg in zip(params, self.params, self.value_views, self.avg_views):
            if p is not own or p.data_ptr() != ptr or state.get(p, {}).get("exp_avg") is not avg:
                return False
        return True


class FlatAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` with each group updated as one flat vector (see the module docstring)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._flat: dict[int, _FlatGroup] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_tensor = [group for group in self.param_groups if not self._flat_step(group)]
        for group in per_tensor:  # the per-tensor loop counts steps per parameter: no shared counter
            self._flat.pop(id(group), None)
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    self.state[p]["step"] = self.state[p]["step"].clone()
        if per_tensor:
            groups, self.param_groups = self.param_groups, per_tensor
            try:
                super().step()
            finally:
                self.param_groups = groups
        return loss

    def _flat_step(self, group: dict) -> bool:
        params = group["params"]
        if not params or group["amsgrad"] or group["maximize"] or group["differentiable"] or group["capturable"]:
            return False
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return False
        flat = self._flat.get(id(group))
        if flat is None or not flat.intact(params, self.state):
            if not _FlatGroup.possible(params, self.state):
                return False
            flat = self._flat[id(group)] = _FlatGroup(params, self.state, bool(group["fused"]))
        grad = torch.cat(grads if flat.all_flat else [g.reshape(-1) for g in grads])
        adamw([flat.values], [grad], [flat.exp_avg], [flat.exp_avg_sq], [], [flat.step],
              foreach=group["foreach"], fused=group["fused"], amsgrad=False, beta1=group["betas"][0],
              beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False, capturable=False, differentiable=False, has_complex=False,
              # set by torch.amp.GradScaler on a fused optimizer, which then unscales (and skips) here
              grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        return True
