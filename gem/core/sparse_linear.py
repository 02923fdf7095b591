"""Truly sparse training of a fixed set of entries of `nn.Linear` weights.

GEM tunes a fixed set of k entries per weight matrix (about 0.1% of the model).
`SparseDeltaLinear` replaces such a linear: the dense weight stays a frozen tensor
(same object, same state_dict key `...weight`), and the only trainable tensor is
`delta`, a vector of k numbers. Before each forward the k selected entries of the
weight are overwritten with `base_values + delta`; the backward pass computes the
gradient of `delta` directly from the layer input and the output gradient.

Design note: why not a dense trainable weight with a masked gradient?
----------------------------------------------------------------------
The usual way (and the authors' code) keeps the weight trainable, lets autograd
form the dense gradient dL/dW = grad_out^T @ x ([out, in]), multiplies it by a 0/1
mask and hands the dense tensor to AdamW. Per matrix and step that costs:

* a dense [out, in] gradient buffer, a dense mask and, worst of all, two dense
  AdamW moment tensors: optimizer memory as large as full fine-tuning
  (8 bytes per weight entry in fp32), for 0.1% of entries that actually move;
* an optimizer step that reads and writes ~5 dense tensors (param, grad, m, v,
  mask) although ~99.9% of the entries must not change;
* weight decay applied by AdamW to every entry of the trainable weight: with a
  masked gradient, decoupled weight decay still shrinks the *unselected* entries
  (their gradient is zero, the decay term is not), so "frozen" entries drift
  unless decay is disabled or masked too. Bit-exact frozen entries are fragile.

Here the gradient of the k selected entries is a gather:
``grad_values[j] = sum_t grad_out[t, row_j] * x[t, col_j]``, O(T*k) work on the
tokens already saved for backward, and no [out, in] tensor is ever formed. The
optimizer sees k numbers per matrix (AdamW state: 2*k), weight decay acts on the
delta only, and unselected entries are never written, so they stay bit-for-bit
equal to the pre-trained weight by construction, not by careful masking.

How the k sums are computed: a sampled dense-dense product (SDDMM,
`torch.sparse.sampled_addmm`) over a CSR pattern of the selected entries, built once
per module. It does O(T*k) multiply-adds without materializing anything of size T*k,
about 8x faster than the gather formulation on one CPU core (MiniLM, T=2048,
k=5.8k: 6.6 ms against 56 ms) and as fast as the dense GEMM at that size. Where a
device lacks the kernel (probed once per device type) the gather runs instead,
chunked over tokens (`MAX_GATHER_ELEMENTS`) so that no temporary exceeds a bound.
Both accumulate in fp32 whatever the activation dtype. The memory and optimizer
savings hold for any k; the compute saving only while k is small relative to out*in.

A third kernel, `dense`, forms the [out, in] product of one matrix at a time inside
backward (a transient; the weight's `.grad` stays None and the optimizer still sees k
numbers) and gathers the k entries; bf16/fp16 inputs keep an fp32 product where the
backend offers it (`torch.mm(..., out_dtype=float32)`). Its cost does not grow with k.
On an H200 (bf16, SmolLM2-135M at 8 x 1024 tokens, RoBERTa-base, MiniLM) it was no faster
than the sampled product end to end: the kernel of these sums moved GEM's step by no more
than run-to-run noise, and GEM's cost over the frozen-model floor there is about LoRA's
(results/README.md, "GPU"; likely per-module launch overhead, not profiled). So `auto`
keeps the sampled product wherever the device has it; `set_weight_grad_kernel()`, the
environment variable GEM_WEIGHT_GRAD_KERNEL, or `experiments/benchmark.py
--weight-grad-kernel` force a kernel.

Why overwrite k weight entries before each forward (instead of a hook on the
optimizer)? It is k writes (cheap), it keeps the forward an ordinary F.linear on a
dense weight (fast kernels, no sparse-dense add), and it is robust to any
optimizer, to `load_state_dict` and to `.to()`: whatever changed `delta`, the next
forward uses it. The write is skipped when nothing changed (tracked with tensor
version counters) so that a second forward before backward, or activation
checkpointing's recomputation, does not invalidate tensors saved for backward.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

# Upper bound on the number of elements of one gathered [tokens, k] temporary in
# the backward pass (2**26 fp32 = 256 MiB; peak is about 3x this: two gathers and
# the fp32 casts). The token dimension is chunked to respect it.
MAX_GATHER_ELEMENTS = 2**26
# Largest [out, in] transient the `dense` kernel forms (2**26 fp32 = 256 MiB); larger
# matrices use the sampled product (or the gather) even when `dense` is forced.
MAX_DENSE_ELEMENTS = 2**26
WEIGHT_GRAD_KERNELS = ("auto", "sddmm", "gather", "dense")
_forced_kernel: str | None = None

DeltaInit = Literal["zero", "w0"]


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


def set_weight_grad_kernel(name: str | None) -> None:
    """Force the kernel of every sparse weight gradient (`sddmm`, `gather`, `dense`);
    `auto` or None: the per-device choice of `weight_grad_kernel`."""
    global _forced_kernel
    if name is not None and name not in WEIGHT_GRAD_KERNELS:
        raise ValueError(f"Unknown weight-gradient kernel {name!r}; use one of {', '.join(WEIGHT_GRAD_KERNELS)}.")
    _forced_kernel = None if name in (None, "auto") else name


def weight_grad_kernel(device: torch.device, shape: tuple[int, int] | None = None) -> str:
    """The kernel `sparse_weight_grad` uses on `device` for a matrix of `shape` ([out, in]):
    the forced one, else the sampled product where the device has it, else the gather."""
    forced = _forced_kernel or os.environ.get("GEM_WEIGHT_GRAD_KERNEL") or "auto"
    if forced not in WEIGHT_GRAD_KERNELS:
        raise ValueError(f"GEM_WEIGHT_GRAD_KERNEL={forced!r}; use one of {', '.join(WEIGHT_GRAD_KERNELS)}.")
    fits = shape is None or shape[0] * shape[1] <= MAX_DENSE_ELEMENTS
    if forced == "dense" and fits:
        return "dense"
    if forced != "gather" and sddmm_supported(device):
        return "sddmm"
    return "gather"


_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32; half-precision inputs keep the fp32 accumulator where the backend can."""
    if a.dtype in (torch.bfloat16, torch.float16):
        key = (a.device.type, a.dtype)
        if _MM_OUT_DTYPE.get(key, True):
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE[key] = True
                return out
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE[key] = False
    return torch.mm(a, b).float()


def sparse_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    max_elements: int = MAX_GATHER_ELEMENTS,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dW at (rows, cols); the weight's `.grad` is never formed.

    `grad_out` has shape [..., out], `x` shape [..., in]; all leading dims are tokens.
    The kernel is `weight_grad_kernel(device)`'s: `sddmm` (needs `pattern`, from
    `selection_pattern(rows, cols, (out, in))`, entries sorted row-major), `dense` (a
    transient [out, in] product, then a gather) or the token-chunked `gather`. Returns
    a float32 vector of length k.
    """
    g = grad_out.reshape(-1, grad_out.shape[-1])
    xs = x.reshape(-1, x.shape[-1])
    if not rows.numel() or not g.shape[0]:
        return torch.zeros(rows.numel(), dtype=torch.float32, device=g.device)
    kernel = weight_grad_kernel(g.device, (g.shape[1], xs.shape[1]))
    if kernel == "dense":
        dense = _mm_fp32_out(g.T, xs.to(g.dtype))
        return dense.view(-1).index_select(0, rows * xs.shape[1] + cols)
    if kernel == "sddmm" and pattern is not None:
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


class SparseDeltaLinearFunction(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward yields the gradient of `values` only.

    `weight` already holds base + delta at the selected entries (written by the
    module); `values` is passed only so that autograd connects the output to it.
    No gradient is returned for `weight` (it is frozen) — the point of this class.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cols, max_elements, pattern):  # type: ignore[override]
        ctx.save_for_backward(x, weight, rows, cols)
        ctx.pattern = pattern  # a constant of the module, not an autograd input
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.values_dtype = values.dtype
        ctx.max_elements = max_elements
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, rows, cols = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            # Under autocast grad_out may be bf16/fp16 while weight is fp32.
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_values = sparse_weight_grad(grad_out, x, rows, cols, ctx.max_elements,
                                             ctx.pattern).to(ctx.values_dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None, None


def merged_values(base_values: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 + delta at the selected entries, added in fp32 and rounded once to `dtype`.

    The one place where the effective weight is computed, so that training, merging
    and applying a saved delta give bit-identical weights.
    """
    return (base_values.float() + delta.float()).to(dtype)


class SparseDeltaLinear(nn.Module):
    """A linear layer whose only trainable parameters are k selected weight entries.

    State (state_dict keys, relative to the module):
      weight       the original dense weight, frozen (requires_grad=False); it holds
                   W0 everywhere and W0 + delta at the selected entries
      bias         the original bias, frozen unless `train_bias`
      delta        nn.Parameter [k]: the trainable change of the selected entries
      indices      int64 [k]: sorted flat indices into weight.view(-1)
      base_values  [k]: W0 at the selected entries (pre-trained values recoverable
                   without a dense copy of the weight)
    `rows`/`cols` are derived, non-persistent buffers.

    `init="zero"` starts at W0 (clean). `init="w0"` reproduces the authors' quirk:
    delta starts as a copy of W0, so the selected entries begin at 2*W0.

    The dense weight is brought up to date at each forward, at `state_dict()` and
    by `materialize()`; right after an optimizer step, code that reads `.weight`
    directly must call `materialize()` first.
    """

    def __init__(
        self,
        linear: nn.Linear,
        indices: torch.Tensor,
        init: DeltaInit = "zero",
        train_bias: bool = False,
        delta_dtype: torch.dtype | None = torch.float32,
        max_gather_elements: int = MAX_GATHER_ELEMENTS,
    ) -> None:
        super().__init__()
        if init not in ("zero", "w0"):
            raise ValueError(f"init must be 'zero' or 'w0', got {init!r}")
        weight = linear.weight
        if not weight.is_contiguous():
            raise ValueError("SparseDeltaLinear needs a contiguous weight (flat indices address weight.view(-1))")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.init = init
        self.max_gather_elements = max_gather_elements
        self._original_requires_grad = (weight.requires_grad, linear.bias.requires_grad if linear.bias is not None else None)

        weight.requires_grad_(False)
        self.weight = weight
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(train_bias)

        indices = indices.to(device=weight.device, dtype=torch.long)
        self.register_buffer("indices", indices)
        self.register_buffer("rows", indices // self.in_features, persistent=False)
        self.register_buffer("cols", indices % self.in_features, persistent=False)
        with torch.no_grad():
            base = weight.view(-1).index_select(0, indices).clone()
        self.register_buffer("base_values", base)
        dtype = delta_dtype or weight.dtype
        start = base.to(dtype) if init == "w0" else torch.zeros_like(base, dtype=dtype)
        self.delta = nn.Parameter(start)
        self._synced_state: tuple | None = None
        self._pattern: tuple[tuple, torch.Tensor] | None = None  # (key, CSR pattern), built lazily
        self.materialize()

    @property
    def num_selected(self) -> int:
        return self.indices.numel()

    # --- keeping the dense weight in step with delta --------------------------------
    def _state_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (self.weight, self.delta, self.base_values, self.indices))

    @torch.no_grad()
    def materialize(self) -> None:
        """Write base_values + delta into the selected entries of the dense weight."""
        values = merged_values(self.base_values, self.delta, self.weight.dtype)
        self.weight.view(-1).index_copy_(0, self.indices, values.to(self.weight.device))
        self._synced_state = self._state_key()

    def _sync_weight(self) -> None:
        # Skip the write when nothing changed: a write bumps the weight's version and
        # would invalidate it for a pending backward (two forwards, checkpointing).
        if self._synced_state != self._state_key():
            self.materialize()

    def selection_pattern(self) -> torch.Tensor:
        """The CSR pattern of the selected entries (for the backward), cached per indices."""
        key = (id(self.indices), self.indices.data_ptr(), self.indices._version, self.indices.device)
        if self._pattern is None or self._pattern[0] != key:
            pattern = selection_pattern(self.rows, self.cols, (self.out_features, self.in_features))
            self._pattern = (key, pattern)
        return self._pattern[1]

    def base_weight(self) -> torch.Tensor:
        """A dense copy of the pre-trained weight W0 (for fingerprints and checks)."""
        with torch.no_grad():
            w0 = self.weight.detach().clone()
            w0.view(-1).index_copy_(0, self.indices, self.base_values.to(w0.dtype))
        return w0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.rows = self.indices // self.in_features
            self.cols = self.indices % self.in_features
        self._synced_state = None
        self._pattern = None

    def __getstate__(self):  # copies and pickles rebuild the CSR pattern instead of carrying it
        state = dict(super().__getstate__())
        state["_pattern"] = None
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        self._sync_weight()  # the saved weight is always base + current delta
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # --- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_weight()
        if torch.is_grad_enabled() and self.delta.requires_grad:
            return SparseDeltaLinearFunction.apply(
                x, self.weight, self.bias, self.delta, self.rows, self.cols, self.max_gather_elements,
                self.selection_pattern(),
            )
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's (merged) weight and bias tensors."""
        self.materialize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight_rg, bias_rg = self._original_requires_grad
        linear.weight = self.weight
        self.weight.requires_grad_(weight_rg)
        if self.bias is not None:
            linear.bias = self.bias
            self.bias.requires_grad_(bool(bias_rg))
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, selected={self.num_selected}, init={self.init}"
        )


# --- model-level helpers ---------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _validate_indices(name: str, linear: nn.Linear, indices: torch.Tensor) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices for {name!r} must be an integer tensor, got {type(indices).__name__} "
                         f"{getattr(indices, 'dtype', '')}")
    if indices.dim() != 1:
        raise ValueError(f"indices for {name!r} must be 1-D flat indices, got shape {tuple(indices.shape)}")
    flat = indices.long()
    numel = linear.weight.numel()
    if flat.numel():
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= numel:
            raise ValueError(
                f"indices for {name!r} out of range: [{low}, {high}] but weight "
                f"{tuple(linear.weight.shape)} has {numel} entries"
            )
    flat = torch.sort(flat).values
    if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise ValueError(f"indices for {name!r} are not unique")
    return flat


def inject_sparse_deltas(
    model: nn.Module,
    indices_by_name: dict[str, torch.Tensor],
    init: DeltaInit = "zero",
    train_bias: bool = False,
    delta_dtype: torch.dtype | None = torch.float32,
) -> dict[str, SparseDeltaLinear]:
    """Replace each named nn.Linear by a SparseDeltaLinear training only its indices.

    Everything is validated before anything is replaced, so a bad entry leaves the
    model untouched. Indices are sorted. The caller freezes the rest of the model.
    """
    modules = dict(model.named_modules())
    checked: dict[str, torch.Tensor] = {}
    for name, indices in indices_by_name.items():
        if name not in modules or name == "":
            raise ValueError(f"no module named {name!r} in {type(model).__name__}")
        module = modules[name]
        if isinstance(module, SparseDeltaLinear):
            raise ValueError(f"module {name!r} already has a sparse delta injected")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")
        checked[name] = _validate_indices(name, module, indices)
    injected: dict[str, SparseDeltaLinear] = {}
    for name, indices in checked.items():
        wrapped = SparseDeltaLinear(modules[name], indices, init=init, train_bias=train_bias, delta_dtype=delta_dtype)
        _set_submodule(model, name, wrapped)
        injected[name] = wrapped
    return injected


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLinear]]:
    """(name, module) for every SparseDeltaLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            yield name, module


def materialize(model: nn.Module) -> None:
    """Write every module's current delta into its dense weight (before eval/export)."""
    for _, module in sparse_modules(model):
        module.materialize()


def remove_sparse_deltas(model: nn.Module) -> dict[str, nn.Linear]:
    """Put plain nn.Linear layers back, with base + delta merged into their weights.

    The result is an ordinary model (e.g. for `save_pretrained`); original
    requires_grad flags of weight and bias are restored.
    """
    restored: dict[str, nn.Linear] = {}
    for name, module in list(sparse_modules(model)):
        linear = module.to_linear()
        _set_submodule(model, name, linear)
        restored[name] = linear
    return restored
