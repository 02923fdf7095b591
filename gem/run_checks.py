"""Checks made before a run writes anything: setting types, the run folder, a resume's config.

A run that fails here leaves no record and changes nothing on disk, so a mistyped rerun into
an existing folder cannot replace a completed record with a failed one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gem.records import redact_secrets


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
    ("task.max_length", "int", 1),
    ("method.density", "float", None),
    ("method.num_grad_samples", "int", None),
]

# Settings a resumed run may change: where things are read from and written to, not what trains.
_RESUME_MAY_CHANGE = ("ckpt_path", "overwrite", "data_dir", "num_workers", "logger", "resume_checkpoints", "paths")


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
            raise RunSetupError(f"{key}={value} must be at least {smallest}")
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


def _example(key: str) -> str:
    return {"optim.lr": "1e-3", "method.density": "0.001", "optim.weight_decay": "0.0"}.get(key, "1")


def check_run_folder(cfg: DictConfig, run_dir: Path, overwrite: bool = False) -> None:
    """Refuse to start over a completed run, and a resume whose settings differ from the killed run's."""
    record = _read_record(run_dir / "results.json")
    resuming = bool(cfg.get("ckpt_path"))
    if record and record.get("status") == "completed" and not overwrite:
        if resuming:
            raise RunSetupError(f"{run_dir} holds a completed run: there is nothing to resume (its results.json "
                                f"and checkpoint/ are kept). Drop ckpt_path to start elsewhere")
        raise RunSetupError(f"{run_dir} already holds a completed run (results.json, status completed); choose "
                            f"another hydra.run.dir, or pass overwrite=true to replace it")
    if not resuming:
        return
    requested = str(cfg.ckpt_path)
    checkpoint = run_dir / "lightning" / "last.ckpt" if requested == "last" else Path(requested)
    if not checkpoint.is_file():
        raise RunSetupError(f"ckpt_path={requested}: no checkpoint at {checkpoint}. Resume with the killed run's "
                            f"folder (hydra.run.dir=<its run dir>) and resume_checkpoints.save_last=true")
    # The killed run's record sits in the checkpoint's run folder (<run dir>/lightning/last.ckpt).
    killed = record if requested == "last" else _read_record(checkpoint.parent.parent / "results.json")
    if killed and "config" in killed:
        changed = config_changes(killed["config"], redact_secrets(OmegaConf.to_container(cfg, resolve=True)))
        if changed:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise RunSetupError(f"ckpt_path={requested}: the resumed run's settings differ from the killed run's "
                                f"({shown}{more}). A resume must repeat the killed run's command; to train "
                                f"with other settings start a new run folder")


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two resolved configs, except what a resume may change."""
    changes = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted in _RESUME_MAY_CHANGE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, dotted + ".")
        elif a != b:
            changes.append((dotted, a, b))
    return changes


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no record, or an unreadable one: nothing to protect or compare
