"""GEM and its neighbours: fixed sparse masks chosen by an entry score and a per-matrix budget.

One class serves every selection rule of the spec's ablation table; the registered
names (`gem`, `gem_uniform`, `grad_uniform`, `grad_entropy`, `random_mask`, `fish`,
`pafi`) differ only in their defaults. The selection needs data (a gradient pass),
which `SparseSelection` (gem/lit/sparse_selection.py) provides before training; this
class holds the glue between the pure math in `gem.core` and the model.
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from gem.core import budgets as B
from gem.core.budgets import BUDGET_RULES
from gem.core.delta import SparseDelta
from gem.core.scores import GRADIENT_KINDS, SCORES, entry_scores
from gem.core.selection import select_masks, top_k_flat_indices, unsorted_threshold_indices
from gem.core.sparse_linear import inject_sparse_deltas, remove_sparse_deltas, sparse_modules

from ._common import merge_options
from .base import Method, MethodError, find_target_linears, load_checkpoint_file

HEAD_FILE = "head.safetensors"


def natural_key(name: str) -> list:
    """`layers.10.q` sorts after `layers.2.q`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
DELTA_DIR = "delta"


class SparseMask(Method):
    """Train only k = floor(density * N_model) selected entries of the target matrices."""

    name = "gem"
    DEFAULTS: dict = {
        "density": 0.001,            # K = floor(density * all parameters of the model)
        "score": "ratio",            # ratio | gradient | fisher | smallest_weight | random
        "budget": "entropy",         # entropy | uniform | global
        "num_grad_samples": 1000,    # training examples in the gradient pass
        "eps": 1e-8,                 # in |G| / (|W0| + eps)
        "min_per_matrix": 0,         # optional floor of entries per matrix
        "delta_init": "zero",        # zero (clean) | w0 (authors' quirk: selected entries start at 2*W0)
        "threshold": "exact",        # exact top-k | unsorted (authors' quirk: threshold from an unsorted topk)
        "verify_untouched": True,    # at the end, count entries that changed outside the mask
        "gradient_pass_mode": "eval",  # eval (dropout off: mask a function of data and weights) | train
    }

    def __init__(self, target_modules: Iterable[str] | None = None, **options):
        super().__init__(target_modules, **merge_options(self.name, self.DEFAULTS, options))
        o = self.options
        if not 0.0 < float(o["density"]) < 1.0:
            raise MethodError(f"{self.name}: method.density={o['density']} is impossible; it must lie in (0, 1), "
                              f"e.g. 0.001 for 0.1% of the model's parameters")
        if o["score"] not in SCORES:
            raise MethodError(f"{self.name}: unknown score {o['score']!r}; choose one of {sorted(SCORES)} (a new "
                              f"score: gem.core.scores.register_score, loaded with extensions=[your.module])")
        if o["score"] in GRADIENT_KINDS and int(o["num_grad_samples"]) < 1:
            raise MethodError(f"{self.name}: method.num_grad_samples={o['num_grad_samples']} but the "
                              f"{o['score']!r} score needs a gradient pass; set it to at least 1 (the paper uses 1000)")
        if o["budget"] not in BUDGET_RULES:
            raise MethodError(f"{self.name}: unknown budget rule {o['budget']!r}; choose one of {sorted(BUDGET_RULES)} "
                              f"(a new rule: gem.core.budgets.register_budget_rule, loaded with extensions=[...])")
        if o["gradient_pass_mode"] not in ("eval", "train"):
            raise MethodError(f"{self.name}: method.gradient_pass_mode={o['gradient_pass_mode']!r}; choose 'eval' "
                              f"(dropout off in the gradient pass) or 'train' (dropout on, as in a training step)")
        if isinstance(o["min_per_matrix"], bool) or not isinstance(o["min_per_matrix"], int) or o["min_per_matrix"] < 0:
            raise MethodError(f"{self.name}: method.min_per_matrix={o['min_per_matrix']!r} must be a whole number "
                              f">= 0 (entries every target matrix gets at least; 0: no floor)")
        if o["threshold"] not in ("exact", "unsorted"):
            raise MethodError(f"{self.name}: method.threshold must be 'exact' or 'unsorted'")
        if not self.target_modules:
            raise MethodError(f"{self.name}: no target modules; set model.target_modules (e.g. [query, value])")
        self.num_model_parameters = 0
        self.total_budget = 0
        self.budgets: dict[str, int] = {}
        self.allocation: list[dict] = []

    # --- preparing: freeze everything but the head; the mask comes later --------------------
    def prepare(self, model: nn.Module, head_parameter_names: Iterable[str] = ()) -> nn.Module:
        # Natural order (layer 2 before layer 10; within a layer by name, as string order was):
        # allocation tables and figures read bottom to top, and random masks draw in this order.
        self.targets = sorted(find_target_linears(model, self.target_modules), key=natural_key)
        self.num_model_parameters = sum(p.numel() for p in model.parameters())
        eligible = sum(model.get_submodule(n).weight.numel() for n in self.targets)
        # Fail now, not after the gradient pass, when the density cannot be honoured.
        self.total_budget = B.total_budget(float(self.options["density"]), self.num_model_parameters, eligible)
        return super().prepare(model, head_parameter_names)

    def is_method_parameter(self, name: str) -> bool:
        return name.endswith(".delta")

    @property
    def needs_gradients(self) -> bool:
        return self.options["score"] in GRADIENT_KINDS

    @property
    def selected(self) -> bool:
        return bool(self.budgets)

    def target_weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: model.get_submodule(name).weight for name in self.targets}

    # --- selection: scores -> budgets -> masks -> injected sparse deltas -------------------------
    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, num_samples: int = 0,
               seed: int = 0) -> dict[str, torch.Tensor]:
        """Choose the masks from the gradient-pass sums and inject the trainable deltas."""
        o = self.options
        weights = {n: w.detach() for n, w in self.target_weights(model).items()}
        generator = torch.Generator(device="cpu").manual_seed(seed)
        scores = entry_scores(o["score"], grads, weights, eps=float(o["eps"]), num_samples=num_samples or None,
                              generator=generator)
        budget_rule = BUDGET_RULES[o["budget"]]
        self.budgets = _integer_budgets(o["budget"], budget_rule(scores, self.total_budget, int(o["min_per_matrix"])))
        spent = sum(self.budgets.values())
        if set(self.budgets) != set(scores) or spent > self.total_budget or min(self.budgets.values()) < 0:
            raise MethodError(f"{self.name}: budget rule {o['budget']!r} gave {spent} entries over "
                              f"{len(self.budgets)} matrices; it must give every one of the {len(scores)} eligible "
                              f"matrices a count >= 0, summing to at most K={self.total_budget}")
        if spent == 0:
            raise MethodError(f"{self.name}: no entry selected: method.density={o['density']} gives K="
                              f"{self.total_budget} entries for {len(scores)} target matrices, and the "
                              f"{o['budget']!r} rule gave each of them 0 (budgets are rounded down). Raise "
                              f"method.density to at least {len(scores) / self.num_model_parameters:.2g} "
                              f"(K >= one entry per matrix) or target fewer matrices")
        if o["threshold"] == "unsorted":
            masks = {n: unsorted_threshold_indices(s, self.budgets[n]) if self.budgets[n] else
                     top_k_flat_indices(s, 0) for n, s in scores.items()}
        else:
            masks = select_masks(scores, self.budgets)
        self.allocation = B.allocation_table(scores, self.budgets) if o["score"] != "random" else \
            [{"name": n, "numel": s.numel(), "budget": self.budgets[n]} for n, s in scores.items()]
        return self.inject_masks(model, masks)

    def inject_masks(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Make the masked entries trainable (also used to restore masks when resuming)."""
        masks = {n: idx for n, idx in masks.items() if idx.numel() > 0}
        inject_sparse_deltas(model, masks, init=self.options["delta_init"])
        if not self.budgets:  # restored masks (resume): the budgets are what was selected
            self.budgets = {n: int(masks[n].numel()) if n in masks else 0 for n in self.targets}
        return masks

    def callbacks(self, *, datamodule, record=None, run_dir=None, seed: int = 0, resume_from=None, **_) -> list:
        from gem.lit.sparse_selection import SparseSelection

        return [SparseSelection(self, datamodule, record=record, run_dir=run_dir, seed=seed, resume_from=resume_from)]

    # --- counting and optimisation ------------------------------------------------------------
    def tuned_count(self, model: nn.Module) -> int:
        return sum(m.delta.numel() for _, m in sparse_modules(model))

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        # Weight decay on a delta pulls it back toward W0 (never toward zero weights); the
        # head follows the base convention (no decay on biases).
        deltas = [p for n, p in model.named_parameters() if p.requires_grad and self.is_method_parameter(n)]
        head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not self.is_method_parameter(n)]
        groups = [{"params": deltas, "weight_decay": weight_decay}] if deltas else []
        decay = [p for n, p in head if p.ndim > 1]
        no_decay = [p for n, p in head if p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": weight_decay}] if decay else []
        groups += [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
        return groups

    def merged_model(self, model: nn.Module) -> nn.Module:
        remove_sparse_deltas(model)  # plain nn.Linear layers with W0 + delta merged in
        return model

    # --- saving: sparse delta (indices + values) and the head ------------------------------------
    def save(self, model: nn.Module, directory: str | Path, extra_config: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = dict(extra_config or {})
        delta = SparseDelta.from_model(model, {
            "base_model_name": extra.get("base_model"), "density": self.options["density"],
            "selection": self.describe(), "budgets": self.budgets})
        delta.save(directory / DELTA_DIR)
        head = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if self._is_head(n)}
        if head:
            save_file(head, str(directory / HEAD_FILE))
        config = {**self.describe(), "head_parameter_names": sorted(self.head_parameter_names), **extra,
                  "bytes_per_tuned_entry": SparseDelta.file_bytes_per_entry(directory / DELTA_DIR)}
        (directory / "method_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load(self, model: nn.Module, directory: str | Path) -> None:
        """Onto a prepared fresh base model: inject the saved deltas, load the head."""
        directory = Path(directory)
        delta = SparseDelta.load(directory / DELTA_DIR)
        delta.inject(model)
        self.budgets = delta.budgets()
        for _, module in sparse_modules(model):
            module.delta.requires_grad_(True)
        if (directory / HEAD_FILE).exists():
            super().load_saved(model, load_checkpoint_file(directory / HEAD_FILE, self.name))

    def describe(self) -> dict:
        return {**super().describe(), "total_budget": self.total_budget,
                "num_model_parameters": self.num_model_parameters}


def _integer_budgets(rule: str, budgets) -> dict[str, int]:
    """A budget rule's output as {matrix: count}, or an error naming the rule and what it gave."""
    if not isinstance(budgets, Mapping):
        raise MethodError(f"budget rule {rule!r} returned {type(budgets).__name__}; it must return a dict "
                          f"{{matrix name: number of entries}}")
    counts = {}
    for name, count in budgets.items():
        if isinstance(count, torch.Tensor) and count.numel() == 1:
            count = count.item()
        if isinstance(count, bool) or not (isinstance(count, numbers.Integral) or
                                           (isinstance(count, float) and count.is_integer())):
            raise MethodError(f"budget rule {rule!r} gave {name} the count {count!r}; counts must be whole numbers "
                              f"(round them down, e.g. K * share // total, so they sum to at most K)")
        counts[name] = int(count)
    return counts


def _preset(name: str, **defaults) -> type[SparseMask]:
    return type(f"SparseMask_{name}", (SparseMask,), {"name": name, "DEFAULTS": {**SparseMask.DEFAULTS, **defaults}})


# The spec's ablation table: (entry score, per-matrix budget).
SPARSE_METHODS: dict[str, type[SparseMask]] = {
    "gem": SparseMask,
    "gem_uniform": _preset("gem_uniform", score="ratio", budget="uniform"),
    "grad_uniform": _preset("grad_uniform", score="gradient", budget="uniform"),
    "grad_entropy": _preset("grad_entropy", score="gradient", budget="entropy"),
    "random_mask": _preset("random_mask", score="random", budget="uniform"),
    "fish": _preset("fish", score="fisher", budget="global"),
    "pafi": _preset("pafi", score="smallest_weight", budget="global"),
}
