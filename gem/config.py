"""OmegaConf resolvers the configs use; registered when `gem` is imported."""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf


def plain_dict(cfg) -> dict:
    """A plain dict from a dict or an OmegaConf DictConfig (resolved)."""
    if OmegaConf.is_config(cfg):
        return dict(OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def lr_from_grid(method_name: str, default_lr: float, lr_index, lr_grids) -> float:
    """`optim.lr`: the method's default, or entry `lr_index` of the preset's grid for this method.

    Paper presets sweep `lr_index=0,1,2` while each method brings its own grid (full FT,
    sparse masks and random masks want LRs orders of magnitude apart), so one multirun
    command covers a fair per-method LR search.
    """
    if lr_index is None:
        return default_lr
    if not lr_grids or method_name not in lr_grids:
        raise ValueError(f"lr_index={lr_index} is set but the experiment defines no lr_grids entry for method "
                         f"{method_name!r}; add lr_grids.{method_name}=[...] or drop lr_index")
    grid = list(lr_grids[method_name])
    if not 0 <= int(lr_index) < len(grid):
        raise ValueError(f"lr_index={lr_index} is outside lr_grids.{method_name} (which has {len(grid)} entries); "
                         f"use lr_index between 0 and {len(grid) - 1}, or lr_index=null for the method's default LR")
    return float(grid[int(lr_index)])


def load_extensions(modules) -> list[str]:
    """Import the modules named in the config's `extensions` (new scores, budget rules or
    methods register themselves on import); a clear error when one cannot be imported."""
    import importlib

    names = [modules] if isinstance(modules, str) else list(modules or [])
    for name in names:
        try:
            importlib.import_module(str(name))
        except ImportError as error:
            raise ImportError(f"extensions: cannot import {name!r} ({error}); put its folder on PYTHONPATH "
                              f"(export PYTHONPATH=<that folder>; `python run.py` adds only run.py's own folder) "
                              f"or install it") from error
    return names


def run_suffix() -> str:
    """The end of a default run folder's name: 6 random hex digits, after `a<task id>-` in a SLURM
    array job. Two runs started in the same second (or array tasks on other nodes) get different
    folders. Cached per config, so Hydra and the run see one value."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return (f"a{task}-" if task and task.isdigit() else "") + secrets.token_hex(3)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lr_from_grid"):
        OmegaConf.register_new_resolver("lr_from_grid", lr_from_grid)
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", run_suffix, use_cache=True)
