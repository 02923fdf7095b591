"""Hydra callbacks: what must happen before Hydra writes into the run folder.

Hydra saves `.hydra/{config,hydra,overrides}.yaml` and opens `run.log` in the run folder before
the job starts (`on_job_start` comes after that; `on_run_start` before). So here, for single runs:

* the run folder's lock (`gem.run_folder`): a second run into a folder in use is refused before
  it writes anything there: it prints why and exits with code 75 (EX_TEMPFAIL: try again
  later). A Hydra callback can only stop the job by exiting: Hydra turns its exceptions into
  warnings.
* when that folder holds a completed run the job will refuse to start (`gem.run_folder`), and
  the completed run's saved command must survive the attempt: the callback turns the saving
  off for that job. With `overwrite=true` it keeps a copy of the completed run's `.hydra/`, put
  back if the new run's settings fail their checks. The refusal itself stays in `gem.train.run`.

A sweep's folder is locked before `multirun.yaml` is written; its job folders are locked by the
jobs themselves (`gem.train.run`), their records keep their own command (`overrides`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from gem.records import process_rank
from gem.run_checks import RunSetupError
from gem.run_folder import HYDRA_BACKUP, RunFolderLocked, acquire_lock, check_not_completed, release_lock

LOCKED_EXIT_CODE = 75  # EX_TEMPFAIL


def _lock_or_exit(folder: Path) -> None:
    # Under DDP, Lightning starts the other ranks as new `run.py` processes in rank 0's folder:
    # rank 0 holds the lock for them.
    if process_rank() != 0:
        return
    try:
        acquire_lock(folder)
    except RunFolderLocked as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(LOCKED_EXIT_CODE) from None


def _folder(config: DictConfig, key: str) -> Path | None:
    try:
        return Path(str(OmegaConf.select(config, key)))
    except Exception:  # an interpolation only Hydra's runtime resolves: the job locks it itself
        return None


class ProtectCompletedRuns(Callback):
    def __init__(self) -> None:
        self._locked: list[Path] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _folder(config, "hydra.run.dir")
        if run_dir is None:
            return
        _lock_or_exit(run_dir)
        self._locked.append(run_dir)
        try:
            record = check_not_completed(run_dir, bool(config.get("ckpt_path")), config.get("overwrite", False))
            if record and record.get("status") == "completed" and (run_dir / ".hydra").is_dir():
                # overwrite=true: keep the completed run's .hydra/ until the new run passes its checks
                # (gem.train.run restores it if they fail, removes it once they pass)
                shutil.rmtree(run_dir / HYDRA_BACKUP, ignore_errors=True)
                shutil.copytree(run_dir / ".hydra", run_dir / HYDRA_BACKUP)
        except RunSetupError:
            with open_dict(config):
                config.hydra.output_subdir = None  # the job refuses to start; keep the folder's .hydra/
        except Exception:  # an interpolation only Hydra's runtime resolves, say: the job checks itself
            return

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        while self._locked:
            release_lock(self._locked.pop())

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _folder(config, "hydra.sweep.dir")
        if sweep_dir is not None:
            _lock_or_exit(sweep_dir)
            self._locked.append(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.on_run_end(config)
