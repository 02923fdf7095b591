"""The sparse delta checkpoint: what a GEM run trained, in about 6 bytes per entry.

A delta is, per weight matrix, the sorted flat indices of the tuned entries and
their trained change `values` (fp32): the fine-tuned weight is
``W0.view(-1)[indices] = W0 + values`` (added in fp32, rounded once to the model's
dtype, exactly as during training). It is stored in a directory:

* `sparse_delta.safetensors` — three flat tensors, all matrices concatenated in the
  order of `matrices` in the JSON:
    `gaps`        uint16 [N]: per matrix, ``index[0] + 1`` then ``index[j] - index[j-1]``
                  (all >= 1 since indices are unique), so 0 is free to mean "escape";
    `large_gaps`  uint32 [E]: the gaps >= 65536, in order, one per 0 in `gaps`
                  (omitted when E = 0);
    `values`      float32 [N].
  Index storage is 2 bytes per entry, plus 4 per escaped gap (only when entries are
  more than 65535 apart, i.e. very sparse matrices). One concatenated tensor each
  (not one per matrix) keeps the safetensors header small and constant.
* `delta_config.json` — format version, base model name, density, selection
  settings, per-matrix name/shape/budget, dtypes, the base fingerprint and the
  sha256 of the safetensors file (so a corrupt file fails loudly).

Fingerprint: sha256 over the pre-trained weights W0 of the matrices that carry a
delta (sorted by name; each contributes its shape and its values rounded to
bfloat16, so the same base loaded in fp32 or bf16 matches). Not covered: the other
parameters (embeddings, norms, a freshly initialised task head, which differs per
run anyway). A delta made for another base model, or for a fine-tuned variant of
the same base, changes these matrices and is rejected before it is applied.

Loading uses safetensors only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from gem.core.sparse_linear import SparseDeltaLinear, inject_sparse_deltas, merged_values, sparse_modules

FORMAT_NAME = "gem-sparse-delta"
FORMAT_VERSION = 1
TENSORS_FILE = "sparse_delta.safetensors"
CONFIG_FILE = "delta_config.json"
_ESCAPE_LIMIT = 1 << 16
_MAX_MATRIX_ENTRIES = 1 << 32


class DeltaError(ValueError):
    """A sparse delta cannot be read or applied; the message says why and what to do."""


# --- index coding ------------------------------------------------------------------------


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices -> (uint16 gaps with 0 = escape, uint32 large gaps)."""
    idx = indices.long().cpu()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint16), torch.zeros(0, dtype=torch.uint32)
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    if bool((gaps <= 0).any()):
        raise DeltaError("indices must be sorted ascending and unique")
    large = gaps >= _ESCAPE_LIMIT
    small = torch.where(large, torch.zeros_like(gaps), gaps)
    return small.to(torch.int32).to(torch.uint16), gaps[large].to(torch.uint32)


def decode_indices(gaps: torch.Tensor, large_gaps: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_indices`; int64 flat indices."""
    full = gaps.to(torch.int64)
    escapes = full == 0
    if int(escapes.sum()) != large_gaps.numel():
        raise DeltaError(f"index stream has {int(escapes.sum())} escapes but {large_gaps.numel()} large gaps")
    full[escapes] = large_gaps.to(torch.int64)
    return torch.cumsum(full, 0) - 1


# --- fingerprint ---------------------------------------------------------------------------


def _base_weight(module: nn.Module, name: str) -> torch.Tensor:
    if isinstance(module, SparseDeltaLinear):
        return module.base_weight()
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise DeltaError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")


def fingerprint_model(model: nn.Module, names: list[str] | tuple[str, ...] | set[str]) -> str:
    """sha256 over the pre-trained weights of the named linears (see module docstring).

    For an injected SparseDeltaLinear the pre-trained weight is reconstructed from
    `base_values`, so the same fingerprint comes out before and after training.
    """
    digest = hashlib.sha256()
    for name in sorted(names):
        weight = _base_weight(_get_module(model, name), name)
        digest.update(f"{tuple(weight.shape)};".encode())
        canonical = weight.to(torch.bfloat16).contiguous().cpu().view(torch.int16)
        digest.update(canonical.numpy().tobytes())
    return digest.hexdigest()


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise DeltaError(
            f"the model ({type(model).__name__}) has no module {name!r} that this delta needs; "
            f"was the delta made for another architecture?"
        ) from None


# --- the delta -----------------------------------------------------------------------------


class SparseDelta:
    """Per matrix: sorted flat indices, fp32 values, and the dense shape.

    `config` holds the JSON metadata (base_model_name, density, selection, ...);
    `fingerprint` the base fingerprint (may be None only for hand-built deltas).
    """

    def __init__(
        self,
        indices: dict[str, torch.Tensor],
        values: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, int]],
        config: dict[str, Any] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if set(indices) != set(values) or set(indices) != set(shapes):
            raise DeltaError("indices, values and shapes must name the same matrices")
        self.indices: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        for name in indices:
            idx, val = indices[name].long().cpu(), values[name].detach().float().cpu()
            if idx.shape != val.shape or idx.dim() != 1:
                raise DeltaError(f"{name!r}: indices {tuple(idx.shape)} and values {tuple(val.shape)} must be equal 1-D")
            order = torch.argsort(idx)
            self.indices[name], self.values[name] = idx[order], val[order]
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        self.config = dict(config or {})
        self.fingerprint = fingerprint

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, metadata: dict[str, Any] | None = None) -> SparseDelta:
        """Gather the trained deltas of every injected SparseDeltaLinear.

        `metadata` is free; the keys `base_model_name`, `density` and `selection`
        (a dict of selection settings) are recorded at the top of delta_config.json.
        """
        found = dict(sparse_modules(model))
        if not found:
            raise DeltaError("the model has no SparseDeltaLinear modules; inject_sparse_deltas first")
        indices = {n: m.indices.detach() for n, m in found.items()}
        values = {n: m.delta.detach() for n, m in found.items()}
        shapes = {n: (m.out_features, m.in_features) for n, m in found.items()}
        config = dict(metadata or {})
        config.setdefault("base_dtype", str(next(iter(found.values())).weight.dtype).removeprefix("torch."))
        return cls(indices, values, shapes, config, fingerprint_model(model, list(found)))

    @property
    def names(self) -> list[str]:
        return list(self.indices)

    @property
    def num_entries(self) -> int:
        return sum(t.numel() for t in self.indices.values())

    def budgets(self) -> dict[str, int]:
        return {n: t.numel() for n, t in self.indices.items()}

    # --- encoding ------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        gaps, large, values = [], [], []
        for name in self.names:
            if self.shapes[name][0] * self.shapes[name][1] >= _MAX_MATRIX_ENTRIES:
                raise DeltaError(f"{name!r}: matrices with 2**32 or more entries are not supported by the index coding")
            g, lg = encode_indices(self.indices[name])
            gaps.append(g)
            large.append(lg)
            values.append(self.values[name])
        tensors = {
            "gaps": torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.uint16),
            "values": torch.cat(values) if values else torch.zeros(0),
        }
        large_all = torch.cat(large) if large else torch.zeros(0, dtype=torch.uint32)
        if large_all.numel():
            tensors["large_gaps"] = large_all
        return tensors

    def bytes_per_entry(self) -> float:
        """Bytes of the stored tensors' data (indices + values) per tuned entry.

        Excludes delta_config.json and the safetensors header (a few hundred bytes,
        constant); `file_bytes_per_entry` reports the whole file.
        """
        data = sum(t.numel() * t.element_size() for t in self._tensors().values())
        return data / max(1, self.num_entries)

    @staticmethod
    def file_bytes_per_entry(directory: str | Path) -> float:
        """Size of a saved sparse_delta.safetensors (header included) per tuned entry."""
        config = json.loads((Path(directory) / CONFIG_FILE).read_text())
        return (Path(directory) / TENSORS_FILE).stat().st_size / max(1, config["total_entries"])

    # --- saving and loading ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = save_safetensors_bytes(self._tensors(), metadata={"format": FORMAT_NAME})
        (directory / TENSORS_FILE).write_bytes(payload)
        extra = {k: v for k, v in self.config.items() if k not in ("base_model_name", "density", "selection")}
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "base_model_name": self.config.get("base_model_name"),
            "density": self.config.get("density"),
            "selection": self.config.get("selection", {}),
            "total_entries": self.num_entries,
            "values_dtype": "float32",
            "index_encoding": "uint16 gaps (first = index+1), 0 = escape to next uint32 in large_gaps",
            "fingerprint": {
                "algorithm": "sha256",
                "covers": "pre-trained weights of the matrices below, sorted by name, shape + bfloat16 values",
                "value": self.fingerprint,
            },
            "matrices": [{"name": n, "shape": list(self.shapes[n]), "budget": self.indices[n].numel()} for n in self.names],
            "tensors_sha256": hashlib.sha256(payload).hexdigest(),
            "metadata": extra,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SparseDelta:
        directory = Path(directory)
        config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
        for path in (config_path, tensors_path):
            if not path.is_file():
                raise DeltaError(f"no sparse delta at {directory}: {path.name} is missing")
        try:
            config = json.loads(config_path.read_text())
            matrices = config["matrices"]
            expected_sha = config["tensors_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DeltaError(f"{config_path} is corrupt or not a sparse delta config ({err})") from None
        if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
            raise DeltaError(f"{config_path}: unsupported format {config.get('format')!r} v{config.get('format_version')!r}")
        payload = tensors_path.read_bytes()
        if hashlib.sha256(payload).hexdigest() != expected_sha:
            raise DeltaError(f"{tensors_path} is corrupt: its sha256 differs from the one in {CONFIG_FILE} (truncated "
                             f"or modified after saving); copy the checkpoint folder again in full, or save it anew")
        try:
            tensors = load_safetensors_bytes(payload)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise DeltaError(f"{tensors_path} is corrupt: {err}") from None
        return cls._from_tensors(tensors, config, tensors_path)

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict, source: Path) -> SparseDelta:
        gaps, values = tensors.get("gaps"), tensors.get("values")
        large = tensors.get("large_gaps", torch.zeros(0, dtype=torch.uint32))
        counts = [int(m["budget"]) for m in config["matrices"]]
        if gaps is None or values is None or gaps.numel() != sum(counts) or values.numel() != sum(counts):
            raise DeltaError(f"{source} is corrupt: tensor sizes do not match the budgets in {CONFIG_FILE}")
        indices, vals, shapes = {}, {}, {}
        gap_parts, value_parts = torch.split(gaps, counts), torch.split(values, counts)
        escapes_per = [int((g.to(torch.int64) == 0).sum()) for g in gap_parts]
        large_parts = torch.split(large, escapes_per) if sum(escapes_per) == large.numel() else None
        if large_parts is None:
            raise DeltaError(f"{source} is corrupt: {large.numel()} large gaps for {sum(escapes_per)} escapes")
        for m, g, lg, v in zip(config["matrices"], gap_parts, large_parts, value_parts):
            name, shape = m["name"], tuple(m["shape"])
            idx = decode_indices(g, lg)
            if idx.numel() and int(idx[-1]) >= shape[0] * shape[1]:
                raise DeltaError(f"{source} is corrupt: indices of {name!r} exceed its shape {shape}")
            indices[name], vals[name], shapes[name] = idx, v, shape
        meta = {k: config.get(k) for k in ("base_model_name", "density", "selection")}
        meta.update(config.get("metadata", {}))
        return cls(indices, vals, shapes, meta, config.get("fingerprint", {}).get("value"))

    # --- applying ----------------------------------------------------------------------------
    def check_model(self, model: nn.Module, check_fingerprint: bool = True) -> None:
        """Raise DeltaError unless every matrix exists with the recorded shape and base."""
        for name in self.names:
            module = _get_module(model, name)
            if isinstance(module, SparseDeltaLinear):
                raise DeltaError(f"module {name!r} already has a sparse delta injected; apply to a fresh base model")
            if not isinstance(module, nn.Linear):
                raise DeltaError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")
            if tuple(module.weight.shape) != self.shapes[name]:
                raise DeltaError(
                    f"shape mismatch for {name!r}: delta made for {self.shapes[name]}, model has "
                    f"{tuple(module.weight.shape)}"
                )
        if check_fingerprint and self.fingerprint is not None:
            found = fingerprint_model(model, self.names)
            if found != self.fingerprint:
                base = self.config.get("base_model_name")
                raise DeltaError(
                    f"this delta was made for base model {base!r} with fingerprint {self.fingerprint[:16]}...; "
                    f"the given model differs (fingerprint {found[:16]}...) — load the base model named in "
                    f"{CONFIG_FILE} (or pass check_fingerprint=False if you know better)"
                )

    def apply_to_weights(self, model: nn.Module, check_fingerprint: bool = True) -> nn.Module:
        """Merge the delta into the dense weights of a fresh base model (plain nn.Linear)."""
        self.check_model(model, check_fingerprint)
        with torch.no_grad():
            for name in self.names:
                weight = _get_module(model, name).weight
                flat_idx = self.indices[name].to(weight.device)
                base = weight.view(-1).index_select(0, flat_idx)
                weight.view(-1).index_copy_(0, flat_idx, merged_values(base, self.values[name].to(weight.device), weight.dtype))
        return model

    def inject(self, model: nn.Module, check_fingerprint: bool = True, **inject_options: Any) -> dict[str, SparseDeltaLinear]:
        """Inject SparseDeltaLinear modules whose deltas start at these values (to continue training)."""
        self.check_model(model, check_fingerprint)
        modules = inject_sparse_deltas(model, self.indices, init="zero", **inject_options)
        with torch.no_grad():
            for name, module in modules.items():
                module.delta.copy_(self.values[name].to(module.delta))
                module.materialize()
        return modules

    def apply(self, model: nn.Module, check_fingerprint: bool = True, inject: bool = False) -> nn.Module:
        """Apply onto a fresh base model: merged into weights (default) or injected."""
        if inject:
            self.inject(model, check_fingerprint)
        else:
            self.apply_to_weights(model, check_fingerprint)
        return model
