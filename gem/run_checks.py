"""Checks made before a run starts: the run folder, a resume's config, setting types.

`check_run_folder` runs before the run writes anything (and, for single runs, before Hydra
saves `.hydra/`, through `gem.hydra_callbacks`): a rerun into a folder that holds a completed
run, or a resume with other settings, changes nothing there. The setting checks run once the
run's record exists, so a refused job of a multirun still leaves a `failed` record.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
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

# Settings a resumed run may change: where things are read from and written to, not what trains
# (the LR in effect is `optim.lr`; `lr_grids` also lists the other methods' grids).
_RESUME_MAY_CHANGE = ("ckpt_path", "overwrite", "data_dir", "num_workers", "logger", "resume_checkpoints", "paths",
                      "trainer.default_root_dir", "lr_grids", "tags")
# What a run writes into its folder; `overwrite=true` removes the previous run's before starting.
_RUN_OUTPUTS = ("results.json", "checkpoint", "lightning", "allocation.csv", "allocation.png",
                "generations_dev.jsonl", "generations_test.jsonl", "evaluations")


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


def check_not_completed(run_dir: Path, resuming: bool, overwrite: Any) -> dict | None:
    """Refuse to start over a completed run (unless `overwrite=true`); return the folder's record."""
    if not isinstance(overwrite, bool):
        raise RunSetupError(f"overwrite={overwrite!r} must be true or false")
    record = _read_record(run_dir / "results.json")
    if record and record.get("status") == "completed" and not overwrite:
        if resuming:
            raise RunSetupError(f"{run_dir} holds a completed run: there is nothing to resume (its results.json "
                                f"and checkpoint/ are kept). Drop ckpt_path to start elsewhere")
        raise RunSetupError(f"{run_dir} already holds a completed run (results.json, status completed); choose "
                            f"another hydra.run.dir, or pass overwrite=true to replace it")
    return record


def check_run_folder(cfg: DictConfig, run_dir: Path) -> bool:
    """Refuse to start over a completed run, and a resume whose settings differ from the killed run's.
    Returns whether `overwrite=true` will replace a completed run: the caller removes its outputs
    (`remove_run_outputs`) only once the new run's settings have passed every check."""
    resuming = bool(cfg.get("ckpt_path"))
    overwrite = cfg.get("overwrite", False)
    record = check_not_completed(run_dir, resuming, overwrite)
    replacing = bool(overwrite and record and record.get("status") == "completed")
    if not resuming:
        return replacing
    requested = str(cfg.ckpt_path)
    checkpoint = requested_checkpoint(requested, run_dir)
    if not checkpoint.is_file():
        raise RunSetupError(f"ckpt_path={requested}: no checkpoint at {checkpoint}. Resume with the killed run's "
                            f"folder (hydra.run.dir=<its run dir>) and resume_checkpoints.save_last=true")
    if not zipfile.is_zipfile(checkpoint):  # torch.save's format; caught before data and model load
        raise RunSetupError(f"ckpt_path={requested}: {checkpoint} is not a training checkpoint (a torch.save "
                            f"file such as <run dir>/lightning/last.ckpt); ckpt_path=last resumes the run folder's own")
    # The killed run's record sits in the checkpoint's run folder (<run dir>/lightning/last.ckpt).
    killed = record if requested == "last" else _read_record(checkpoint.parent.parent / "results.json")
    if killed and "config" in killed:
        # The new config as its record will hold it (JSON: string keys), for a like-for-like comparison.
        new = json.loads(json.dumps(redact_secrets(OmegaConf.to_container(cfg, resolve=True)), default=str))
        # what trains first: a different method, task or model is the change a reader must see
        changed = sorted(config_changes(killed["config"], new), key=lambda c: c[0] not in _IDENTITY_KEYS)
        if changed:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise RunSetupError(f"ckpt_path={requested}: the resumed run's settings differ from the killed run's "
                                f"({shown}{more}). A resume must repeat the killed run's command; to train "
                                f"with other settings start a new run folder")
    return replacing


_IDENTITY_KEYS = ("method.name", "task.name", "model.name", "seed")
# Where the Hydra callback keeps a completed run's `.hydra/` while `overwrite=true` is checked.
HYDRA_BACKUP = ".hydra.before_overwrite"


def remove_run_outputs(run_dir: Path) -> None:
    """`overwrite=true`, the new run cleared to start: remove the previous run's outputs, so the
    folder never mixes the old run's checkpoint with the new run's record."""
    for name in (*_RUN_OUTPUTS, HYDRA_BACKUP):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def restore_hydra_files(run_dir: Path) -> None:
    """`overwrite=true` refused: put back the completed run's `.hydra/` that Hydra replaced."""
    backup = run_dir / HYDRA_BACKUP
    if backup.is_dir():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        backup.rename(run_dir / ".hydra")


def requested_checkpoint(requested: str, run_dir: Path) -> Path:
    """`ckpt_path=last` is the run folder's own resume checkpoint; anything else is a path."""
    return run_dir / "lightning" / "last.ckpt" if requested == "last" else Path(requested)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two resolved configs, except what a resume may
    change. A key the old config lacks is new in the code since the killed run started (it
    could not have been set then), so it is not a change."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        if dotted in _RESUME_MAY_CHANGE or key not in old:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, dotted + ".")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            changes.append((dotted, a, b))
    return changes


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no record, or an unreadable one: nothing to protect or compare
