"""GEM's one gradient pass before training: summed gradients of the eligible matrices.

Plain torch (a model, an iterable of batches, a loss function): no optimizer step, and
the model leaves exactly as it came (weights, `requires_grad` flags, train/eval mode,
`.grad` fields).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def training_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The ordinary training loss of a Hugging Face model (`labels` in the batch)."""
    return model(**batch).loss


@contextmanager
def _only_these_require_grad(model: nn.Module, weights: list[nn.Parameter], train_mode: bool = False):
    """Gradients for `weights` alone (no wasted weight-gradient GEMMs elsewhere); restore after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        # Dropout off by default: the mask is then a deterministic function of the data and the
        # weights. The spec says only "the ordinary training loss"; train mode (dropout on, as in
        # an optimizer step) is the other reading, and an option.
        model.train(train_mode)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
        model.train(was_training)


def _move(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _per_example(batch: Mapping[str, torch.Tensor]) -> Iterable[dict]:
    size = batch_size(batch)
    for i in range(size):
        yield {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    weights: Mapping[str, nn.Parameter],
    *,
    loss_fn: LossFn = training_loss,
    squared_per_example: bool = False,
    device: torch.device | None = None,
    train_mode: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over batches of dL_b/dW for each weight in `weights` (keyed by module name).

    With `squared_per_example` (FISH), returns instead the sum over single examples of
    (dL_i/dW)**2, computing one backward per example. `train_mode` runs the pass with the
    model in train mode (dropout on) instead of eval mode. Returns the sums (fp32, on the
    weights' device) and the number of examples seen.
    """
    device = device or next(iter(weights.values())).device
    params = list(weights.values())
    # fp32 weights: let autograd accumulate into `.grad` in place, so the pass holds one copy of the
    # target gradients (the same fp32 additions, in the same order, as explicit sums). Otherwise
    # (half-precision weights, squared per-example gradients) the sums live apart, in fp32.
    into_grad = not squared_per_example and all(w.dtype == torch.float32 for w in params)
    sums = {} if into_grad else {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    seen = 0
    with _only_these_require_grad(model, params, train_mode):
        for batch in batches:
            batch = _move(batch, device)
            units = _per_example(batch) if squared_per_example else [batch]
            for unit in units:
                loss = loss_fn(model, unit)
                if into_grad:
                    torch.autograd.backward(loss, inputs=params)
                else:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for (name, _), grad in zip(weights.items(), grads):
                        if grad is not None:
                            sums[name] += grad.float().square() if squared_per_example else grad.float()
                seen += 1 if squared_per_example else batch_size(unit)
        if into_grad:  # taken before the context puts the callers' `.grad` back
            sums = {name: w.grad if w.grad is not None else torch.zeros_like(w) for name, w in weights.items()}
    return sums, seen


def batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    """Examples in a model-input dict: the leading size of its first tensor."""
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def all_reduce_sums(sums: dict[str, torch.Tensor], seen: int) -> tuple[dict[str, torch.Tensor], int]:
    """Under torch.distributed, sum over ranks so every rank computes the same mask."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums, seen
    for tensor in sums.values():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    count = torch.tensor([seen], dtype=torch.long, device=next(iter(sums.values())).device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    return sums, int(count.item())
