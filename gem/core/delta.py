"""How a trained sparse delta is stored: indices in about 2 bytes per entry, and the base's fingerprint.

A GEM adapter holds, per weight matrix, the sorted flat indices of its tuned entries and
their trained change (fp32 values): 6 bytes per entry when the indices are stored as
gaps. Sorted unique indices have gaps >= 1, so a uint16 gap of 0 is free to mean
"escape": the real gap (>= 65536, only in very sparse matrices) is the next uint32 of
a second stream.

The fingerprint identifies the pre-trained weights W0 a delta was trained on: sha256 over
the named matrices sorted by name, each contributing its shape and its values rounded to
bfloat16 (so the same base loaded in fp32 or bf16 matches). An adapter applied to another
base (or a fine-tuned variant of it) would silently add its delta to the wrong weights;
the fingerprint turns that into an error.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

_ESCAPE_LIMIT = 1 << 16
MAX_MATRIX_ENTRIES = 1 << 32  # flat indices must fit the uint32 escape stream


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices -> (uint16 gaps with 0 = escape, uint32 large gaps)."""
    idx = indices.long().cpu()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint16), torch.zeros(0, dtype=torch.uint32)
    if int(idx[-1]) >= MAX_MATRIX_ENTRIES:
        raise ValueError("flat indices of 2**32 or more are not supported by the index coding")
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    if bool((gaps <= 0).any()):
        raise ValueError("indices must be sorted ascending and unique")
    large = gaps >= _ESCAPE_LIMIT
    small = torch.where(large, torch.zeros_like(gaps), gaps)
    return small.to(torch.int32).to(torch.uint16), gaps[large].to(torch.uint32)


def decode_indices(gaps: torch.Tensor, large_gaps: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `encode_indices`; int64 flat indices."""
    full = gaps.to(torch.int64)
    escapes = full == 0
    large = large_gaps if large_gaps is not None else torch.zeros(0, dtype=torch.uint32)
    if int(escapes.sum()) != large.numel():
        raise ValueError(f"index stream has {int(escapes.sum())} escapes but {large.numel()} large gaps: the "
                         f"adapter file is corrupt")
    full[escapes] = large.to(torch.int64)
    return torch.cumsum(full, 0) - 1


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the named pre-trained weights (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        weight = weights[name].detach()
        digest.update(f"{tuple(weight.shape)};".encode())
        digest.update(weight.to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
