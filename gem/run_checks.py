"""Checks of a run's settings, made before anything loads: types, smallest sensible values, the
accelerator, the learning rate.

They run inside `gem.run_folder.open_run` once the folder checks passed, so a refused job of a
multirun still leaves a `failed` record. The run folder's own checks (a completed run, a
resume's settings and checkpoint, the lock) live in `gem.run_folder`.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf


class RunSetupError(ValueError):
    """A run that must not start: the message says what was wrong and how to fix it."""


# (dotted key, kind, smallest allowed value or None). Checked only where the key is set.
_NUMBERS = [
    ("seed", "int", None),
    ("batch_size", "int", 1),
    ("eval_batch_size", "int", 1),
    ("optim.lr", "float", None),
    ("optim.weight_decay", "float", 0),
    ("trainer.max_epochs", "int", None),
    ("task.num_train", "int", None),
    ("task.num_dev", "int", None),
    ("task.num_test", "int", None),
    # Below 8 tokens a sentence pair does not fit beside its special tokens ([CLS] a [SEP] b [SEP]):
    # the tokenizer then truncates nothing and passes the whole text on.
    ("task.max_length", "int", 8),
    ("model.max_length", "int", 8),
    ("method.density", "float", None),
    ("method.num_grad_samples", "int", None),
]


def check_setting_types(cfg: DictConfig) -> None:
    """Numbers must be numbers (a mistyped `optim.lr=abc` fails here, naming the key, not
    deep inside the optimizer after the model loaded)."""
    for key, kind, smallest in _NUMBERS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = is_int if kind == "int" else (is_int or isinstance(value, float)) and math.isfinite(value)
        if not ok:
            expected = "a whole number" if kind == "int" else "a finite number"
            raise RunSetupError(f"{key}={value!r} must be {expected}; e.g. {key}={_example(key)}")
        if smallest is not None and value < smallest:
            why = " (shorter leaves no room for a sentence pair beside its special tokens)" if "max_length" in key else ""
            raise RunSetupError(f"{key}={value} must be at least {smallest}{why}")
    for key in ("overwrite", "resume_unverified"):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise RunSetupError(f"{key}={value!r} must be true or false")
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if max_epochs is not None and max_epochs < 1 and not (isinstance(max_steps, int) and max_steps > 0):
        raise RunSetupError(f"trainer.max_epochs={max_epochs} trains nothing (the test score would be the "
                            f"untrained model's); set trainer.max_epochs to at least 1")


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: say which trainer to use instead."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RunSetupError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; use trainer=cpu "
                                f"(or trainer=default, which takes what the machine has)")


def check_learning_rate(cfg: DictConfig, trains: bool) -> None:
    """A method that trains needs a positive LR: zero trains nothing, a negative one climbs the loss.
    Checked before the data and the model load (and before GEM's gradient pass)."""
    lr = OmegaConf.select(cfg, "optim.lr", default=None)
    if trains and isinstance(lr, (int, float)) and not lr > 0:
        raise RunSetupError(f"optim.lr={lr} must be positive for method {cfg.method.name} (it trains); "
                            f"e.g. optim.lr=1e-3")


def _example(key: str) -> str:
    return {"optim.lr": "1e-3", "method.density": "0.001", "optim.weight_decay": "0.0"}.get(key, "1")
