"""`GemConfig`: every option of GEM and its ablations, typed and checked, in PEFT's config form.

One config serves the library (`gem.select_entries` + `peft.get_peft_model`), the saved
adapter (`adapter_config.json`) and `run.py method=gem` (the Hydra group's keys are these
fields). The selection writes its results onto the config: `budgets` (entries per matrix,
saved, as PEFT's EVA saves its data-chosen `rank_pattern`) and `indices` (the selected flat
indices, held in memory until `get_peft_model` and saved only in the adapter's safetensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft import PeftConfig

from gem.core import budgets as B
from gem.core import scores as S


class GemConfigError(ValueError):
    """A GEM setting is impossible; the message names the setting (`method.<name>` in run.py)."""


@dataclass
class GemConfig(PeftConfig):
    """GEM (Kang et al., arXiv 2508.16191): tune ``K = floor(density * all parameters)`` entries of
    the target matrices, chosen by `score` per entry, split over matrices by `budget`.

    The ablations of the paper are other (`score`, `budget`) pairs: gem_uniform (ratio, uniform),
    grad_uniform (gradient, uniform), grad_entropy (gradient, entropy), random_mask (random,
    uniform), fish (fisher, global), pafi (smallest_weight, global); scores and budget rules
    registered with `gem.core.scores.register_score` / `gem.core.budgets.register_budget_rule`
    are named the same way.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (suffix match) or a regex of the nn.Linear / GPT-2 Conv1D layers to tune"})
    density: float = field(default=0.001, metadata={"help": "K = floor(density * all parameters of the model)"})
    score: str = field(default="ratio", metadata={"help": "entry score: ratio |G|/(|W0|+eps), gradient, fisher, "
                                                          "smallest_weight, random, or a registered one"})
    budget: str = field(default="entropy", metadata={"help": "split of K over matrices: entropy, uniform, global, "
                                                             "or a registered rule"})
    num_grad_samples: int = field(default=1000, metadata={"help": "training examples in the gradient pass"})
    eps: float = field(default=1e-8, metadata={"help": "eps in |G| / (|W0| + eps)"})
    min_per_matrix: int = field(default=0, metadata={"help": "entries every target matrix gets at least"})
    delta_init: str = field(default="zero", metadata={"help": "zero, or w0 (the authors' quirk: entries start at 2*W0)"})
    threshold: str = field(default="exact", metadata={"help": "exact top-k, or unsorted (the authors' quirk)"})
    gradient_pass_mode: str = field(default="eval", metadata={"help": "eval (dropout off in the gradient pass) or "
                                                                      "train (dropout on)"})
    gradient_pass_loss: str = field(
        default="task", metadata={"help": "run.py on decoders: task (the training loss, candidate scoring) or lm "
                                          "(the authors' pass: plain LM loss over prompt + gold answer)"})
    seed: int = field(default=0, metadata={"help": "seed of the random score's draw"})
    verify_untouched: bool = field(default=True, metadata={"help": "run.py: count entries changed outside the mask"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (a new task head)"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules not to tune"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Not supported by GEM"})
    # Written by `select_entries`:
    budgets: dict[str, int] = field(default_factory=dict, metadata={"help": "entries per matrix (set by the selection)"})
    total_budget: Optional[int] = field(default=None, metadata={"help": "K (set by the selection)"})
    num_model_parameters: Optional[int] = field(default=None, metadata={"help": "N of K = floor(density * N)"})
    base_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "sha256 of the target matrices' W0 (set by the selection; checked at load; "
                                        "null skips the check)"})
    # In memory only, never in adapter_config.json: the selected flat indices per matrix.
    indices: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        from gem.tuner import GEM_PEFT_TYPE, check_peft_version

        check_peft_version()
        self.peft_type = GEM_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise GemConfigError("GemConfig.target_modules is empty: name the layers to tune (e.g. ['query', 'value'] "
                                 "for BERT, ['q_proj', 'v_proj'] for LLaMA; model.target_modules in run.py)")
        if self.target_parameters:
            raise GemConfigError("GemConfig.target_parameters is not supported: GEM tunes entries of nn.Linear or "
                                 "Conv1D weights named in target_modules")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or \
                not 0.0 < float(self.density) < 1.0:
            raise GemConfigError(f"density={self.density!r} (method.density) is impossible; it must lie in (0, 1), "
                                 f"e.g. 0.001 for 0.1% of the model's parameters")
        for name, allowed in (("delta_init", ("zero", "w0")), ("threshold", ("exact", "unsorted")),
                              ("gradient_pass_mode", ("eval", "train")), ("gradient_pass_loss", ("task", "lm"))):
            if getattr(self, name) not in allowed:
                raise GemConfigError(f"{name}={getattr(self, name)!r} (method.{name}); choose one of {list(allowed)}")
        if isinstance(self.min_per_matrix, bool) or not isinstance(self.min_per_matrix, int) or self.min_per_matrix < 0:
            raise GemConfigError(f"min_per_matrix={self.min_per_matrix!r} (method.min_per_matrix) must be a whole "
                                 f"number >= 0 (entries every target matrix gets at least; 0: no floor)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (math.isfinite(self.eps)
                                                                                       and self.eps >= 0):
            raise GemConfigError(f"eps={self.eps!r} (method.eps) must be a finite number >= 0")
        if not self.budgets:
            # A config that will select must know its rules; a loaded adapter (budgets saved) needs
            # neither rule to load, so a registered rule need not be importable to use it.
            self.check_rules()

    def check_rules(self) -> None:
        """The score and budget rule are registered, and the gradient pass has examples if it runs."""
        if self.score not in S.SCORES:
            raise GemConfigError(f"unknown score {self.score!r} (method.score); choose one of {sorted(S.SCORES)} (a "
                                 f"new score: gem.core.scores.register_score, in run.py loaded with extensions=[...])")
        if self.budget not in B.BUDGET_RULES:
            raise GemConfigError(f"unknown budget rule {self.budget!r} (method.budget); choose one of "
                                 f"{sorted(B.BUDGET_RULES)} (a new rule: gem.core.budgets.register_budget_rule, in "
                                 f"run.py loaded with extensions=[...])")
        if self.score_rule.needs_gradients and (isinstance(self.num_grad_samples, bool) or
                                                not isinstance(self.num_grad_samples, int) or self.num_grad_samples < 1):
            raise GemConfigError(f"num_grad_samples={self.num_grad_samples!r} (method.num_grad_samples) but the "
                                 f"{self.score!r} score needs a gradient pass; set it to at least 1 (the paper uses 1000)")

    @property
    def score_rule(self) -> S.ScoreRule:
        return S.score_rule(self.score)

    @property
    def selected(self) -> bool:
        """Whether the selection has run (or the budgets were loaded with a saved adapter)."""
        return bool(self.budgets)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("indices", None)  # the indices belong in the adapter's safetensors, never in JSON
        return data
