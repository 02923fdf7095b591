"""The adapter's index coding: uint16 gaps with a uint32 escape stream, round trip exact."""

from __future__ import annotations

import pytest
import torch

from gem.core.delta import decode_indices, encode_indices, fingerprint


def test_index_coding_round_trip_with_escapes():
    idx = torch.tensor([0, 1, 65535, 65536 + 65535, 200_000, 200_001, 3_000_000])
    gaps, large = encode_indices(idx)
    assert gaps.dtype == torch.uint16 and large.dtype == torch.uint32
    assert large.numel() == 3  # gaps 65536, 68929 and 2799999 escape to uint32
    assert torch.equal(decode_indices(gaps, large), idx)


def test_index_coding_refuses_unsorted_and_corrupt_streams():
    with pytest.raises(ValueError, match="sorted ascending and unique"):
        encode_indices(torch.tensor([3, 1]))
    gaps, large = encode_indices(torch.tensor([0, 70_000]))
    with pytest.raises(ValueError, match="escapes but 0 large gaps"):
        decode_indices(gaps, None)


def test_fingerprint_covers_values_in_bf16_and_shapes():
    w = torch.randn(4, 6)
    assert fingerprint({"a": w}) == fingerprint({"a": w.to(torch.bfloat16)})
    assert fingerprint({"a": w}) != fingerprint({"a": w + 1})
    assert fingerprint({"a": w}) != fingerprint({"a": w.reshape(6, 4)})
