"""Truly sparse training of a fixed set of entries of a dense weight: the math, pure torch.

GEM tunes k selected entries per weight matrix (about 0.1% of the model). The layer
(`gem.tuner.layer.GemLinear`) keeps the dense weight frozen and writes ``W0 + delta``
into the k selected entries before a forward; the only trainable tensor is `delta`
(k numbers). This module holds what that layer computes:

* `SparseEntriesFunction`: the dense forward, and a backward that returns the gradient
  of the k entries only. ``grad[j] = sum_t grad_out[t, row_j] * x[t, col_j]`` is O(T*k)
  on the tensors already saved for backward; no [out, in] gradient is formed, the
  optimizer holds 2k numbers of state, weight decay acts on the delta only, and
  unselected entries are never written, so they stay bit-for-bit W0 by construction.
  (A dense trainable weight with a masked gradient, the authors' way, costs a dense
  gradient, dense AdamW moments, and lets decoupled weight decay move masked entries.)
* the kernels of those k sums: a sampled dense-dense product (`torch.sparse.sampled_addmm`
  over a CSR pattern of the entries, built once per layer; about 8x faster than a gather
  on one CPU core for MiniLM), and a token-chunked gather where a device lacks it. Both
  accumulate in fp32 whatever the activation dtype. (A transient dense [out, in] product
  then a gather was measured on an H200 and was no faster end to end; results/README.md.)
* `merged_values`: ``W0 + delta`` added in fp32 and rounded once, the one place the
  effective weight is computed, so training, merging and loading give identical weights.

Why write k entries before each forward instead of adding a sparse product to the
output: the forward stays one dense GEMM (fast kernels), and it is robust to any
optimizer, `load_state_dict` and `.to()`: whatever changed `delta`, the next forward
uses it (`write_entries` says how the write stays out of autograd's way).
"""

from __future__ import annotations

import warnings
import torch
import torch.nn.functional as F


# Upper bound on the number of elements of one gathered [tokens, k] temporary in
# the backward pass (2**26 fp32 = 256 MiB; peak is about 3x this: two gathers and
# the fp32 casts). The token dimension is chunked to respect it.
MAX_GATHER_ELEMENTS = 2**26
# Up to this many tokens per step the gather (4 small ops) beats the sampled product, whose
# sparse-tensor set-up costs about 40 dispatcher calls: steps this small are bound by
# per-module host cost (the `--preset dispatch` benchmark), not arithmetic. Paper-sized
# batches (MiniLM: ~500 tokens) stay on the sampled product, and so on today's sums.
SMALL_TOKENS = 64


def selection_pattern(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A float32 CSR tensor of `shape` whose non-zeros are the (rows, cols) entries.

    Entries must be sorted row-major (sorted flat indices are), so the CSR values of
    any product sampled on this pattern come out in the same order as `rows`/`cols`.
    """
    num_rows = shape[0]
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    if rows.numel():
        crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on sampled_addmm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.long(), torch.zeros(rows.numel(), device=rows.device),
                                       size=shape, check_invariants=True)


_SDDMM_SUPPORT: dict[str, bool] = {}


def sddmm_supported(device: torch.device) -> bool:
    """Whether torch.sparse.sampled_addmm runs (fp32, CSR) on this device type; probed once."""
    kind = torch.device(device).type
    if kind not in _SDDMM_SUPPORT:
        try:
            pattern = selection_pattern(torch.tensor([0, 1], device=device), torch.tensor([1, 0], device=device), (2, 2))
            a = torch.ones(2, 3, device=device)
            values = torch.sparse.sampled_addmm(pattern, a, a.T, beta=0.0).values()
            _SDDMM_SUPPORT[kind] = bool(torch.allclose(values.cpu(), torch.full((2,), 3.0)))
        except (RuntimeError, NotImplementedError):
            _SDDMM_SUPPORT[kind] = False
    return _SDDMM_SUPPORT[kind]


def sparse_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    max_elements: int = MAX_GATHER_ELEMENTS,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dW at (rows, cols); the weight's `.grad` is never formed.

    `grad_out` has shape [..., out], `x` shape [..., in]; all leading dims are tokens. Small
    steps (`SMALL_TOKENS`) take one gather; otherwise, with a `pattern`
    (`selection_pattern(rows, cols, (out, in))`, entries sorted row-major), the sampled product
    runs where the device has it, else the token-chunked gather.
    Returns a float32 vector of length k.
    """
    g = grad_out.reshape(-1, grad_out.shape[-1])
    xs = x.reshape(-1, x.shape[-1])
    if not rows.numel() or not g.shape[0]:
        return torch.zeros(rows.numel(), dtype=torch.float32, device=g.device)
    if g.shape[0] <= SMALL_TOKENS:
        g_sel, x_sel = g.index_select(1, rows), xs.index_select(1, cols)
        if g_sel.dtype != torch.float32:
            g_sel, x_sel = g_sel.float(), x_sel.float()
        return g_sel.mul_(x_sel).sum(0)
    if pattern is not None and sddmm_supported(g.device):
        return torch.sparse.sampled_addmm(pattern, g.T.float(), xs.float(), beta=0.0).values()
    return _gathered_weight_grad(g, xs, rows, cols, max_elements)


def _gathered_weight_grad(
    g: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, max_elements: int
) -> torch.Tensor:
    """sum_t g[t, rows] * xs[t, cols], chunked over tokens to bound the [t, k] temporaries."""
    k = rows.numel()
    result = torch.zeros(k, dtype=torch.float32, device=g.device)
    tokens = g.shape[0]
    if k == 0 or tokens == 0:
        return result
    chunk = max(1, max_elements // k)
    for start in range(0, tokens, chunk):
        g_sel = g[start : start + chunk].index_select(1, rows).float()
        x_sel = xs[start : start + chunk].index_select(1, cols).float()
        result += g_sel.mul_(x_sel).sum(0)
    return result


class Geometry:
    """Where a layer's k entries sit: rows and cols in the stored weight's layout, the CSR pattern
    the sampled product needs, and whether the weight is GPT-2's Conv1D ([in, out]). One object,
    built once per indices tensor, so the autograd function takes one argument for all of it."""

    __slots__ = ("rows", "cols", "pattern", "transposed", "device_type")

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], transposed: bool):
        self.rows, self.cols = indices // shape[1], indices % shape[1]
        self.pattern = selection_pattern(self.rows, self.cols, shape)
        self.transposed = transposed
        self.device_type = indices.device.type  # the layer's device: where autocast is asked about


class SparseEntriesFunction(torch.autograd.Function):
    """The layer's dense forward whose backward yields the gradient of `values` only.

    `weight` already holds W0 + delta at the selected entries (the layer writes them);
    `values` is passed only so that autograd connects the output to it. No gradient is
    returned for `weight` (it is frozen): the point of this class. `geometry.transposed` is
    GPT-2's Conv1D layout (weight [in, out], y = x @ W + b); otherwise nn.Linear's ([out, in]).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, geometry):  # type: ignore[override]
        ctx.x_dtype = x.dtype
        if torch.is_autocast_enabled(geometry.device_type):
            # Save the input as the matmul reads it (autocast would cast it anyway), as a plain linear
            # does: half the memory of keeping the fp32 input for backward.
            compute = torch.get_autocast_dtype(geometry.device_type)
            if x.dtype != compute and x.is_floating_point():
                x = x.to(compute)
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry  # a constant of the layer, not an autograd input
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.values_dtype = values.dtype
        return dense_forward(x, weight, bias, geometry.transposed)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        geometry = ctx.geometry
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            # Under autocast grad_out may be bf16/fp16 while weight is fp32.
            w = weight if weight.dtype == grad_out.dtype else weight.to(grad_out.dtype)
            grad_x = grad_out @ (w.T if geometry.transposed else w)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            # dL/dW[r, c] = sum_t left[t, r] * right[t, c]: (grad_out, x) for [out, in], (x, grad_out) for [in, out]
            left, right = (x, grad_out) if geometry.transposed else (grad_out, x)
            grad_values = sparse_weight_grad(left, right, geometry.rows, geometry.cols, pattern=geometry.pattern)
            if grad_values.dtype != ctx.values_dtype:
                grad_values = grad_values.to(ctx.values_dtype)
        return grad_x, None, grad_bias, grad_values, None


def dense_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """nn.Linear's forward, or GPT-2 Conv1D's (addmm on the flattened tokens, as transformers computes it)."""
    if not transposed:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[-1])


def merged_values(base_values: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 + delta at the selected entries, added in fp32 and rounded once to `dtype`.

    The one place where the effective weight is computed, so that training, merging
    and loading a saved adapter give bit-identical weights.
    """
    if base_values.dtype == delta.dtype == dtype == torch.float32:
        return base_values + delta  # the same sum without three no-op casts (this runs every forward)
    return (base_values.float() + delta.float()).to(dtype)


def write_entries(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """weight.view(-1)[indices] = values, in place, invisible to autograd's version counter.

    Through `.data`, so that rewriting the same values (every forward does) never invalidates
    the weight saved for a pending backward (a second forward, activation checkpointing). The
    values only change between a backward and the next forward (an optimizer step), and
    optimizers do not reliably bump versions (fused AdamW does not), so the layer does not
    try to detect changes: it writes k entries per forward.
    """
    if values.dtype != weight.dtype or values.device != weight.device:
        values = values.to(device=weight.device, dtype=weight.dtype)
    weight.data.view(-1).index_copy_(0, indices, values)


def validate_indices(name: str, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted unique int64 flat indices into a weight of `numel` entries, or a ValueError naming `name`."""
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices for {name!r} must be an integer tensor, got {type(indices).__name__} "
                         f"{getattr(indices, 'dtype', '')}")
    if indices.dim() != 1:
        raise ValueError(f"indices for {name!r} must be 1-D flat indices, got shape {tuple(indices.shape)}")
    flat = torch.sort(indices.long()).values
    if flat.numel():
        low, high = int(flat[0]), int(flat[-1])
        if low < 0 or high >= numel:
            raise ValueError(f"indices for {name!r} out of range: [{low}, {high}] but the weight has {numel} entries")
        if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
            raise ValueError(f"indices for {name!r} are not unique")
    return flat
